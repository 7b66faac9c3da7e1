"""CLI command `plan`: memory per device of an OPD run under DDP and FSDP, from configs only."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cli.common import WORLD_DIR


def register(app: typer.Typer) -> None:
    """Add `plan` to the top-level app."""

    @app.command("plan")
    def plan(
        teacher: Path = typer.Option(WORLD_DIR / "teacher", help="Teacher checkpoint dir or config.json."),
        student: Path = typer.Option(WORLD_DIR / "student", help="Student checkpoint dir or config.json."),
        devices: int = typer.Option(1, help="Devices (FSDP shards N ways; DDP replicates)."),
        device_gb: float = typer.Option(80.0, help="Memory per device in GB (1e9 bytes) for the verdict."),
        batch_size: int = typer.Option(32, help="Prompts per step per device."),
        slots: int = typer.Option(0, help="Rollouts in flight at once (0: the whole batch)."),
        budget: int = typer.Option(1024, help="Rollout budget (max new tokens)."),
        prompt_len: int = typer.Option(256, help="Prompt length in tokens."),
        chunk_size: int = typer.Option(16, help="Teacher scoring chunk size C."),
        micro_batch: int = typer.Option(8, help="Rollouts per backward pass."),
        loss: str = typer.Option("topk", help="topk (tokens x (k+1) teacher state) | full (tokens x vocab) | sampled."),
        top_k: int = typer.Option(64, help="k of the top-k loss."),
        dtype: str = typer.Option("bf16", help="Teacher weights / compute dtype: fp32 | bf16."),
        student_dtype: str = typer.Option("fp32", help="Student weights: fp32 | bf16 (+ fp32 master)."),
        shard_teacher: bool = typer.Option(False, help="FSDP: shard the teacher too."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (bytes)."),
    ) -> None:
        """Memory per device (weights, gradients, AdamW, teacher KV cache and state, activations)."""
        from kat_diag.opd.plan import ModelShape, PlanConfig, format_plan
        from kat_diag.opd.plan import plan as make_plan

        cfg = PlanConfig(devices=devices, batch_size=batch_size, slots=slots, budget=budget, prompt_len=prompt_len,
                         chunk_size=chunk_size, micro_batch=micro_batch, loss=loss, top_k=top_k, dtype=dtype,
                         student_dtype=student_dtype, shard_teacher=shard_teacher, device_gb=device_gb)
        p = make_plan(ModelShape.from_path(teacher), ModelShape.from_path(student), cfg)
        typer.echo(json.dumps(p, indent=2) if as_json else format_plan(p))
