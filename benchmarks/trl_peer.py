"""kat-diag next to TRL on the embedded world: seconds per step and generated tokens/s, as ratios to plain TRL.

Side by side in one process, same prompts per step (kat-diag's `prompt_indices`; TRL reads them in that
order, `shuffle_dataset=False`), budget 192, lr 1e-4 (constant after 5 warm-up steps), full-vocabulary
reverse-KL loss, temperature 1, fp32, gradient checkpointing off, no traces:

    trl            plain `trl.DistillationTrainer`
    trl_kat_online `KATDistillationTrainer`, mode="online" (kat-diag's engine generates; KAT, world preset)
    trl_kat_posthoc `KATDistillationTrainer`, mode="posthoc" (TRL generates; one scoring pass; KAT)
    katdiag_none   `kat-diag train --termination none --loss full`
    katdiag_kat    `kat-diag train --termination kat --loss full`

at each prompts-per-step value, `--repeats` times (methods interleaved within a repeat; repeat r uses seed r
for prompts and sampling in every method, so the repeats also differ in what is sampled). Per run: wall
seconds per step (time between consecutive step ends, so everything a step does counts) over the steps
from K (KAT's warm-up; the "active" window) and over steps 1..N-1 ("all"), and generated tokens/s (tokens
sampled / seconds spent generating: TRL's `generate`; the engine's rollout, teacher scoring included;
tokens a chunk sampled past a fire count as generated). gen_len_mean: tokens sampled per rollout;
kept_len_mean: tokens trained on per rollout.
Reported: the median over repeats of each number and of each run's ratio to the same repeat's plain TRL.

Usage: python benchmarks/trl_peer.py [--steps 15] [--repeats 3] [--prompts 16,32] [--quick]
Prints one JSON line per run, then one JSON object (the summary) as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kat_diag.kat.config import KATConfig  # noqa: E402
from kat_diag.opd.config import SamplingConfig, TrainConfig  # noqa: E402
from kat_diag.opd.trainer import prompt_indices, train  # noqa: E402
from kat_diag.world.paths import load_world_splits  # noqa: E402

METHODS = ("trl", "trl_kat_online", "trl_kat_posthoc", "katdiag_none", "katdiag_kat")
LR, WARMUP = 1e-4, 5


def _window(values: list[float], lo: int) -> list[float]:
    return values[lo:]


def run_trl(world: Path, method: str, batch: int, steps: int, budget: int, out: Path, seed: int) -> dict[str, Any]:
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from kat_diag.integrations.trl import KATDistillationTrainer

    problems = load_world_splits(world)["train"]
    order = [i for s in range(steps) for i in prompt_indices(s, batch, 0, 1, len(problems), seed)]
    ds = Dataset.from_list([problems[i].to_json() for i in order])
    tok = AutoTokenizer.from_pretrained(world / "student")
    student = AutoModelForCausalLM.from_pretrained(world / "student")
    teacher = AutoModelForCausalLM.from_pretrained(world / "teacher")
    args = DistillationConfig(
        output_dir=str(out), bf16=False, use_cpu=True, per_device_train_batch_size=batch, max_steps=steps,
        max_completion_length=budget, learning_rate=LR, lr_scheduler_type="constant_with_warmup",
        warmup_steps=WARMUP, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, report_to="none",
        logging_steps=1, save_strategy="no", gradient_checkpointing=False, shuffle_dataset=False, seed=seed,
        disable_tqdm=True)
    base = DistillationTrainer if method == "trl" else KATDistillationTrainer
    gen_s: list[float] = []
    gen_tok: list[int] = []

    class Timed(base):  # type: ignore[misc, valid-type]
        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            ids = super()._generate_single_turn(*a, **kw)
            gen_s.append(time.perf_counter() - t0)
            online = getattr(self, "_online", None)  # online KAT: tokens sampled, discarded ones included
            gen_tok.append(online[1] if online else sum(len(x) for x in ids))
            return ids

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

    kw: dict[str, Any] = {}
    if method != "trl":
        kw = dict(termination="kat", kat=KATConfig(), mode="online" if method == "trl_kat_online" else "posthoc")
    tr = Timed(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
               callbacks=[Clock()], **kw)
    for cb in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        tr.remove_callback(cb)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    return {"step_ends": ends, "gen_seconds": gen_s, "gen_tokens": gen_tok,
            # post-hoc: TRL's completions/* are the whole completions; kat/kept_len_mean is what is trained on
            "kept_len_mean": [h.get("kat/kept_len_mean", h.get("completions/mean_length")) for h in logs],
            "fired_share": [h.get("kat/fired_share", 0.0) for h in logs],
            "gen_len_mean": [t / batch for t in gen_tok]}  # tokens sampled per rollout


def run_katdiag(world: Path, method: str, batch: int, steps: int, budget: int, out: Path,
                seed: int) -> dict[str, Any]:
    cfg = TrainConfig(teacher=str(world / "teacher"), student=str(world / "student"), out=str(out), steps=steps,
                      batch_size=batch, micro_batch=batch, lr=LR, warmup_steps=WARMUP, schedule="constant",
                      loss="full", termination="none" if method == "katdiag_none" else "kat", kat=KATConfig(),
                      sampling=SamplingConfig(max_new_tokens=budget, chunk_size=16), eval_n=0, ckpt_every=0,
                      trace_every=0, progress=False, seed=seed, device="cpu")
    ends: list[float] = []
    rows: list[dict[str, Any]] = []

    def on_step(step: int, m: dict[str, Any]) -> None:
        ends.append(time.perf_counter())
        rows.append(m)

    train(cfg, overwrite=True, on_step=on_step)
    return {"step_ends": ends, "gen_seconds": [m["rollout_time"] for m in rows],
            "gen_tokens": [int(round(m["tokens_per_s"] * m["rollout_time"])) for m in rows],
            "kept_len_mean": [m["kept_len_mean"] for m in rows], "fired_share": [m["fired_share"] for m in rows],
            "gen_len_mean": [m["tokens_per_s"] * m["rollout_time"] / batch for m in rows]}


def summarise(raw: dict[str, Any], lo: int) -> dict[str, float]:
    """Seconds per step over steps lo..N-1 (step ends minus the previous step end) and tokens/s there."""
    ends = raw["step_ends"]
    durations = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # durations[i] = step i + 1
    lo = max(lo, 1)
    win = durations[lo - 1:]
    gen_s, gen_t = sum(raw["gen_seconds"][lo:]), sum(raw["gen_tokens"][lo:])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"seconds_per_step": sum(win) / len(win), "gen_tokens_per_s": gen_t / gen_s,
            "gen_tokens_per_step": gen_t / len(win), "kept_len_mean": mean(raw["kept_len_mean"][lo:]),
            "gen_len_mean": mean(raw["gen_len_mean"][lo:]), "fired_share": mean(raw["fired_share"][lo:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, default=ROOT / "data" / "world", help="World directory.")
    ap.add_argument("--steps", type=int, default=15, help="Training steps per run (>= 10 after warm-up: 15).")
    ap.add_argument("--repeats", type=int, default=3, help="Runs of every method per prompts-per-step value.")
    ap.add_argument("--prompts", default="16,32", help="Prompts per step, comma-separated.")
    ap.add_argument("--budget", type=int, default=192, help="Generation budget (tokens).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine).")
    ap.add_argument("--quick", action="store_true", help="Smoke run: 7 steps, 1 repeat, 8 prompts.")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.repeats, a.prompts = 7, 1, "8"
    torch.set_num_threads(a.threads)
    sizes = [int(x) for x in a.prompts.split(",")]
    K = KATConfig().warmup_steps
    runs: dict[str, dict[str, list[dict[str, float]]]] = {str(b): {m: [] for m in METHODS} for b in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for b in sizes:
                for m in METHODS:
                    out = Path(tmp) / f"{m}-{b}-{rep}"
                    fn = run_trl if m.startswith("trl") else run_katdiag
                    raw = fn(a.world, m, b, a.steps, a.budget, out, rep)
                    res = {"active": summarise(raw, K), "all": summarise(raw, 1)}
                    runs[str(b)][m].append(res)
                    print(json.dumps({"repeat": rep, "prompts": b, "method": m, **res}), flush=True)
    med = statistics.median
    summary: dict[str, Any] = {}
    for b in map(str, sizes):
        summary[b] = {}
        for m in METHODS:
            entry: dict[str, Any] = {}
            for w in ("active", "all"):
                rs, ps = runs[b][m], runs[b]["trl"]
                entry[w] = {k: med([r[w][k] for r in rs]) for k in rs[0][w]}
                entry[w]["step_time_ratio"] = med([r[w]["seconds_per_step"] / p[w]["seconds_per_step"]
                                                   for r, p in zip(rs, ps, strict=True)])
                entry[w]["tokens_per_s_ratio"] = med([r[w]["gen_tokens_per_s"] / p[w]["gen_tokens_per_s"]
                                                      for r, p in zip(rs, ps, strict=True)])
            summary[b][m] = entry
    import transformers
    import trl

    print(json.dumps({
        "benchmark": "trl_peer", "steps": a.steps, "repeats": a.repeats, "budget": a.budget, "threads": a.threads,
        "kat_warmup_steps": K, "windows": {"active": f"steps {K}..{a.steps - 1}", "all": f"steps 1..{a.steps - 1}"},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "results": summary,
    }))


if __name__ == "__main__":
    main()
