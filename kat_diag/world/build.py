"""The embedded world: data, tokenizer, tiny teacher and student, built reproducibly from a seed.

Nothing can be downloaded here, so the project ships its own model organism (docs/world.md): the
arithmetic task of `tasks`, the character tokenizer of `tokenizer`, and two Qwen3-architecture
models SFT'd by `sft` — a teacher that solves the easy splits and a smaller, weaker student. The
result is a directory laid out like real checkpoints on disk:

    WORLD/world.json            config, parameter counts, build time, SFT losses
    WORLD/data/{train,ops2,ops3,ops4,ops5}.jsonl
    WORLD/tokenizer/            AutoTokenizer.from_pretrained
    WORLD/teacher/, WORLD/student/   AutoModelForCausalLM.from_pretrained (tokenizer saved too)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kat_diag.data.problems import write_jsonl
from kat_diag.models import count_parameters, tiny_qwen3_config
from kat_diag.world.sft import SFTConfig, train_sft
from kat_diag.world.tasks import BENCHMARK_OPS, LoopDocs, sft_batches, world_splits
from kat_diag.world.tokenizer import save_char_tokenizer


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    sft: SFTConfig = field(default_factory=SFTConfig)  # stage 1: step-by-step solutions
    loops: LoopDocs | tuple[LoopDocs, ...] = LoopDocs()  # stage 2 mixture: loop documents, one kind or several
    loop_sft: SFTConfig = SFTConfig(steps=0)  # stage 2 (after stage 1; steps 0: no stage 2)
    mix: tuple[LoopDocs, ...] = ()  # stage 1 mixture: loop documents, each kind its share of the batches


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_train: int = 4000  # OPD training prompts
    n_bench: int = 200  # problems per benchmark split
    sft_ops: tuple[int, ...] = (2, 3, 4, 5)
    width: int = 2  # zero-pad numbers to this many digits: fixed-width step lines, exactly periodic loops
    # The trap is planted in the SFT mixtures (docs/world.md): a share of each model's
    # batches are documents that fall into a repetition loop of a correct step
    # (tasks.spontaneous_loop_variant). The student gets many short ones (48 characters: its loss weight
    # on the loop start is high, so it starts loops often) and some that run to the 192-token budget
    # (so its loops go on). The teacher gets long ones in stage 1 (it follows a loop once begun), then a
    # short stage 2 with short and long ones, so it starts loops itself at a lower rate than the student
    # (loop/ln 1.5 % vs 4.5 % on ops5) yet never greedily: OPD then has little signal at the loop start
    # and the trap survives training. Teachers that start no loops let OPD remove them
    # (docs/world.md, "Teachers for a trap that lasts").
    teacher: ModelSpec = ModelSpec(128, 4, 4, 384, SFTConfig(steps=900, batch_size=64, lr=3e-3, seed=1),
                                   loops=(LoopDocs(0.3, 48, spontaneous=True), LoopDocs(0.08, 192, spontaneous=True)),
                                   loop_sft=SFTConfig(steps=200, batch_size=64, lr=1e-3, warmup=10, seed=5),
                                   mix=(LoopDocs(0.12, 192, spontaneous=True),))
    student: ModelSpec = ModelSpec(128, 3, 4, 384, SFTConfig(steps=1000, batch_size=64, lr=3e-3, seed=2),
                                   mix=(LoopDocs(0.4, 48, spontaneous=True), LoopDocs(0.15, 192, spontaneous=True)))

    @staticmethod
    def quick() -> WorldConfig:
        """A small world for tests: same code path, seconds instead of minutes."""
        return WorldConfig(
            n_train=64,
            n_bench=16,
            teacher=ModelSpec(32, 2, 2, 64, SFTConfig(steps=30, batch_size=16, lr=3e-3, seed=1),
                              LoopDocs(0.2, 64, 1), SFTConfig(steps=5, batch_size=16, lr=1e-3, warmup=2, seed=5),
                              mix=(LoopDocs(0.1, 64, spontaneous=True),)),
            student=ModelSpec(16, 1, 2, 32, SFTConfig(steps=15, batch_size=16, lr=3e-3, seed=2),
                              LoopDocs(0.3, 64, 0), SFTConfig(steps=5, batch_size=16, lr=1e-3, warmup=2, seed=6),
                              mix=(LoopDocs(0.4, 48, spontaneous=True),)),
        )


def _build_model(spec: ModelSpec, tok, seed: int):
    from transformers import AutoModelForCausalLM

    cfg = tiny_qwen3_config(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        num_layers=spec.layers,
        num_heads=spec.heads,
        intermediate_size=spec.intermediate,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def _load_stage1(world: Path, role: str, spec: ModelSpec, tok, seed: int):
    """A stage-1 checkpoint of an earlier build of the same config (same stage-1 SFT and mixture, no
    stage 2)."""
    from transformers import AutoModelForCausalLM

    info = json.loads((world / "world.json").read_text()) if (world / "world.json").exists() else None
    prev = info["config"][role] if info else {}
    stage1 = info and info["config"]["seed"] == seed and prev["sft"] == asdict(spec.sft) and \
        prev.get("mix", []) == [asdict(k) for k in spec.mix] and not prev.get("loop_sft", {}).get("steps")
    if not stage1:
        raise ValueError(f"--stage1-from {world}: its {role} is not stage 1 of this config (same stage-1 SFT and "
                         f"mixture, no stage 2 in its world.json)")
    model = AutoModelForCausalLM.from_pretrained(world / role)
    got = (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size)
    if got != (spec.hidden, spec.layers, len(tok)):
        raise ValueError(f"--stage1-from {world}: {role} has (hidden, layers, vocab) {got}, this config "
                         f"{(spec.hidden, spec.layers, len(tok))}")
    return model


def build_world(out_dir: str | Path, cfg: WorldConfig = WorldConfig(), progress: bool = True,
                stage1_from: str | Path | None = None) -> dict:
    """Build data, tokenizer, teacher and student into `out_dir`; return the world summary.

    Each model gets stage 1 (SFT from random init on solutions mixed with `spec.mix` loop documents)
    and, where `spec.loop_sft.steps` > 0, stage 2 (a short SFT on a mixture with `spec.loops`; the
    committed teacher's). `stage1_from`: take the stage-1 models from an earlier build
    of the same config instead of retraining them (stage 1 is deterministic in the seed), so a
    stage-2 recipe can be iterated in minutes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)

    splits = world_splits(cfg.seed, cfg.n_train, cfg.n_bench, width=cfg.width)
    for name, probs in splits.items():
        write_jsonl(probs, out / "data" / f"{name}.jsonl")
    bench_prompts = {p.prompt for name in BENCHMARK_OPS for p in splits[name]}
    tok = save_char_tokenizer(out / "tokenizer")

    summary: dict = {"config": asdict(cfg), "models": {},
                     "stage1_from": None if stage1_from is None else str(stage1_from)}
    for role, spec, seed_off in (("teacher", cfg.teacher, 11), ("student", cfg.student, 23)):
        t_model = time.time()
        if stage1_from is None:
            model = _build_model(spec, tok, cfg.seed * 100 + seed_off)
            batches = iter(sft_batches(cfg.seed * 100 + seed_off, cfg.sft_ops, bench_prompts, spec.sft.batch_size,
                                       spec.mix, cfg.width))
            losses = train_sft(model, tok, batches, spec.sft, desc=f"sft {role}", progress=progress)
        else:
            model, losses = _load_stage1(Path(stage1_from), role, spec, tok, cfg.seed), []
        if spec.loop_sft.steps:
            batches = iter(sft_batches(cfg.seed * 100 + spec.loop_sft.seed, cfg.sft_ops, bench_prompts,
                                       spec.loop_sft.batch_size, spec.loops, cfg.width))
            losses = train_sft(model, tok, batches, spec.loop_sft, desc=f"sft+loops {role}", progress=progress)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        summary["models"][role] = {
            "parameters": count_parameters(model),
            "sft_final_loss": float(sum(losses[-20:]) / max(1, len(losses[-20:]))),
            "sft_seconds": round(time.time() - t_model, 1),
        }
    summary["build_seconds"] = round(time.time() - t0, 1)
    summary["build_cpu_seconds"] = round(time.process_time() - cpu0, 1)  # wall time under load says little
    (out / "world.json").write_text(json.dumps(summary, indent=2))
    return summary
