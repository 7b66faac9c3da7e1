"""Rollout-engine benchmark on the embedded world; prints one JSON object on its last line.

* online_vs_posthoc: throughput (generated tokens/s) of online chunked scoring (C = W, policy
  `none`) divided by that of generate-then-score-once (student `generate`, then ONE teacher forward
  over the finished sequences) on the same prompts. Also the lockstep (C = 1) figure.
* kat_step_speedup: mean trainer step time under `none` divided by that under `kat` (steps after
  KAT's warm-up), next to generated_length_ratio = mean generated tokens per rollout under `kat` /
  under `none`. Target: kat_step_speedup >= 0.8 / generated_length_ratio.

Usage: python benchmarks/rollout.py [--world data/world] [--steps 12] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kat_diag.detector import KATConfig  # noqa: E402
from kat_diag.models import load_model, load_tokenizer  # noqa: E402
from kat_diag.rollout import RolloutEngine, SamplingConfig, encode_prompts  # noqa: E402
from kat_diag.termination import make_policy  # noqa: E402
from kat_diag.trainer import TrainConfig, train  # noqa: E402
from kat_diag.world import load_world_splits  # noqa: E402


def posthoc(student, teacher, tok, prompts: list[str], max_new: int, seed: int) -> tuple[float, int]:
    """Generate with the student, then score every finished sequence in one teacher forward."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        seqs = student.generate(**enc, max_new_tokens=max_new, do_sample=True, top_k=0, temperature=1.0,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        mask = (seqs != tok.pad_token_id).long()
        mask[:, : enc["input_ids"].shape[1]] = enc["attention_mask"]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        s_lp = torch.log_softmax(student(input_ids=seqs, attention_mask=mask, position_ids=pos).logits, -1)
        t_lp = torch.log_softmax(teacher(input_ids=seqs, attention_mask=mask, position_ids=pos).logits, -1)
        kl = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    n_tok = int(mask[:, enc["input_ids"].shape[1]:].sum())
    _ = kl.sum().item()
    return time.perf_counter() - t0, n_tok


def online(student, teacher, tok, prompts: list[str], cfg: SamplingConfig, seed: int) -> tuple[float, int]:
    eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id, cfg)
    policy = make_policy("none")
    policy.begin_step(0)
    t0 = time.perf_counter()
    _, stats = eng.run(encode_prompts(tok, prompts), policy, torch.Generator().manual_seed(seed))
    return time.perf_counter() - t0, stats.generated_tokens


def step_times(world: Path, termination: str, steps: int, kat: KATConfig, out: Path, batch: int, slots: int,
               max_new: int) -> tuple[float, float]:
    cfg = TrainConfig(
        teacher=str(world / "teacher"), student=str(world / "student"), out=str(out), steps=steps,
        batch_size=batch, micro_batch=batch, termination=termination, kat=kat, device="cpu", progress=False,
        sampling=SamplingConfig(max_new_tokens=max_new, chunk_size=kat.window, slots=slots),
        ckpt_every=0, trace_every=0, lr=2e-4,
    )
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r and r["step"] >= kat.warmup_steps]
    return (sum(r["step_time"] for r in rows) / len(rows), sum(r["gen_len_mean"] for r in rows) / len(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=ROOT / "data" / "world")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--steps", type=int, default=12, help="trainer steps per policy (after KAT warm-up)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)

    tok = load_tokenizer(args.world / "tokenizer")
    student = load_model(args.world / "student", device="cpu").eval()
    teacher = load_model(args.world / "teacher", device="cpu").eval()
    prompts = [p.prompt for p in load_world_splits(args.world)["train"][: args.prompts]]
    kat = KATConfig()
    res: dict[str, float | int | str] = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                                         "window": kat.window}

    # Warm up kernels once, then time each mode.
    online(student, teacher, tok, prompts[:8], SamplingConfig(max_new_tokens=16, chunk_size=kat.window), 0)
    t_post, n_post = posthoc(student, teacher, tok, prompts, args.max_new_tokens, 1)
    t_on, n_on = online(student, teacher, tok, prompts,
                        SamplingConfig(max_new_tokens=args.max_new_tokens, chunk_size=kat.window), 1)
    t_lock, n_lock = online(student, teacher, tok, prompts,
                            SamplingConfig(max_new_tokens=args.max_new_tokens, chunk_size=1), 1)
    res.update(
        posthoc_tokens_per_s=n_post / t_post, online_chunkW_tokens_per_s=n_on / t_on,
        online_lockstep_tokens_per_s=n_lock / t_lock,
        online_vs_posthoc=(n_on / t_on) / (n_post / t_post),
        lockstep_vs_posthoc=(n_lock / t_lock) / (n_post / t_post),
    )
    print(json.dumps(res), flush=True)

    steps = args.steps + kat.warmup_steps
    with tempfile.TemporaryDirectory() as tmp:
        t_none, len_none = step_times(args.world, "none", steps, kat, Path(tmp) / "none", args.batch, args.slots,
                                      args.max_new_tokens)
        t_kat, len_kat = step_times(args.world, "kat", steps, kat, Path(tmp) / "kat", args.batch, args.slots,
                                    args.max_new_tokens)
    ratio = len_kat / len_none
    res.update(
        step_time_none=t_none, step_time_kat=t_kat, gen_len_none=len_none, gen_len_kat=len_kat,
        kat_step_speedup=t_none / t_kat, generated_length_ratio=ratio,
        speedup_target=0.8 / ratio, meets_speedup_target=bool(t_none / t_kat >= 0.8 / ratio),
        meets_online_target=bool(res["online_vs_posthoc"] >= 0.9),
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
