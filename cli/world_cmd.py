"""CLI commands for the embedded world: `world build`, `world eval`, and the end-to-end `demo`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from kat_diag.world import DEFAULT_WORLD_DIR, WorldConfig

world_app = typer.Typer(help="Build and evaluate the embedded arithmetic world.", no_args_is_help=True)


@world_app.command("build")
def build(
    out: Path = typer.Option(DEFAULT_WORLD_DIR, help="Directory to write the world into."),
    quick: bool = typer.Option(False, help="Build a small world in seconds (for tests)."),
    seed: int = typer.Option(0, help="Seed: the build is reproducible from it."),
) -> None:
    """Build data, tokenizer, teacher and student (SFT from random init)."""
    from kat_diag.world import build_world

    cfg = WorldConfig.quick() if quick else WorldConfig()
    cfg = replace(cfg, seed=seed)
    summary = build_world(out, cfg)
    for role, info in summary["models"].items():
        typer.echo(f"{role}: {info['parameters']:,} parameters, SFT loss {info['sft_final_loss']:.4f}, "
                   f"{info['sft_seconds']:.0f} s")
    typer.echo(f"world written to {out} in {summary['build_seconds']:.0f} s")


def _eval_table(res: dict[str, dict[str, dict[str, float]]]) -> str:
    roles = list(res)
    splits = list(res[roles[0]])
    metrics = [m for m in res[roles[0]][splits[0]] if m != "n"]
    head = f"{'model':8s} {'metric':8s} " + " ".join(f"{s:>7s}" for s in splits)
    lines = [head, "-" * len(head)]
    for role in roles:
        for m in metrics:
            lines.append(f"{role:8s} {m:8s} " + " ".join(f"{res[role][s][m]:7.3f}" for s in splits))
    return "\n".join(lines)


def run_world_eval(world: Path, k: int, n: int | None, seed: int, max_new_tokens: int) -> dict:
    from kat_diag.evaluation import evaluate_benchmarks
    from kat_diag.models import load_model, load_tokenizer
    from kat_diag.world import load_world_splits, world_paths

    paths = world_paths(world)
    splits = load_world_splits(world)
    bench = {name: probs[:n] if n else probs for name, probs in splits.items() if name != "train"}
    tok = load_tokenizer(paths["tokenizer"])
    res = {}
    for role in ("teacher", "student"):
        model = load_model(paths[role], what=role, device="cpu")
        res[role] = evaluate_benchmarks(model, tok, bench, k=k, seed=seed, max_new_tokens=max_new_tokens)
    return res


@world_app.command("eval")
def eval_(
    world: Path = typer.Option(DEFAULT_WORLD_DIR, help="World directory (from `world build`)."),
    k: int = typer.Option(8, help="Samples per problem for avg@k / pass@k (0: greedy only)."),
    n: int = typer.Option(0, help="Problems per split (0: all)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    max_new_tokens: int = typer.Option(96, help="Generation budget per completion."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on the last line."),
) -> None:
    """Greedy accuracy and avg@k / pass@k of teacher and student on each benchmark split."""
    res = run_world_eval(world, k, n or None, seed, max_new_tokens)
    typer.echo(_eval_table(res))
    if as_json:
        typer.echo(json.dumps(res))


def register(app: typer.Typer) -> None:
    """Add the `world` group and `demo` to the top-level app."""
    app.add_typer(world_app, name="world")

    @app.command("demo")
    def demo(
        world: Path = typer.Option(DEFAULT_WORLD_DIR, help="World directory; built if missing."),
        out: Path = typer.Option(Path("runs/demo"), help="Directory for the demo's training runs."),
        k: int = typer.Option(8, help="Samples per problem for avg@k / pass@k."),
        steps: int = typer.Option(20, help="OPD steps of the demo's KAT run."),
    ) -> None:
        """The embedded pipeline end to end: world, evaluation, OPD with KAT, trace summary, replay."""
        from kat_diag.detector import KATConfig
        from kat_diag.rollout import SamplingConfig
        from kat_diag.trace_view import format_summary, summarize
        from kat_diag.traces import TraceReader
        from kat_diag.trainer import TrainConfig, train

        if not (world / "student" / "config.json").exists():
            typer.echo(f"no world at {world}: building it (about 15 minutes on 2 cores)")
            build(out=world, quick=False, seed=0)
        typer.echo("== 1. world evaluation (greedy, avg@k, pass@k) ==")
        typer.echo(_eval_table(run_world_eval(world, k, None, 0, 96)))
        run = out / "kat"
        typer.echo(f"== 2. OPD with KAT, {steps} steps -> {run} ==")
        cfg = TrainConfig(teacher=str(world / "teacher"), student=str(world / "student"), out=str(run),
                          steps=steps, kat=KATConfig(), sampling=SamplingConfig(max_new_tokens=192, slots=16),
                          eval_n=50, eval_k=4, ckpt_every=10)
        metrics = train(cfg).metrics
        typer.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                               if not k.startswith("policy/")}))
        typer.echo("== 3. trace store summary (kat-diag inspect) ==")
        typer.echo(format_summary(summarize(TraceReader(run))))
