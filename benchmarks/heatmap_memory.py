"""Peak memory of `kat-diag heatmap` on a large synthetic trace store (default 100k rollouts x 2k tokens).

The heatmap never loads a store: one pass over scalar columns, then the kl column of a seeded sample
of rollouts per stage. This benchmark writes a store of that size with `TraceWriter` (once; reused
when it exists), runs `kat-diag heatmap` on it in a fresh process and reports that process's peak
resident memory (VmHWM, from getrusage of the child) as one JSON line. Writing 200 M tokens takes a
few minutes on 2 cores; the store takes about 1 GB of disk (random KL does not compress).

    python benchmarks/heatmap_memory.py                      # 100k x 2000, store in /tmp/kat-heatmap-store
    python benchmarks/heatmap_memory.py --rollouts 2000 --tokens 500 --store /tmp/small
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_store(path: Path, rollouts: int, tokens: int, steps: int, seed: int = 0) -> float:
    """Synthetic store: lognormal KL, a low block planted in every other rollout, graded answers."""
    from kat_diag.traces.ragged import Ragged
    from kat_diag.traces.writer import TraceWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    per_step = rollouts // steps
    offsets = np.arange(per_step + 1, dtype=np.int64) * tokens
    with TraceWriter(path, top_n=1, config={"kat": {"window": 16, "persistence": 8, "min_length": 32}}) as w:
        for step in range(steps):
            kl = rng.lognormal(-2.0, 1.5, size=(per_step, tokens)).astype(np.float32)
            start = rng.integers(0, tokens // 2, size=per_step)
            cols = np.arange(tokens)
            plant = (np.arange(per_step)[:, None] % 2 == 0) & (cols >= start[:, None]) & (cols < start[:, None] + 300)
            kl[plant] = 1e-3
            w.append({
                "step": step, "prompt_id": "synthetic", "policy": "none",
                "kl": Ragged(offsets, kl.reshape(-1)),
                "token_ids": Ragged(offsets, np.zeros(per_step * tokens, dtype=np.int32)),
                "correct": (rng.random(per_step) < 0.5).tolist(),
            })
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=100_000)
    ap.add_argument("--tokens", type=int, default=2000, help="tokens per rollout")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--store", type=Path, default=Path("/tmp/kat-heatmap-store"))
    ap.add_argument("--remove", action="store_true", help="delete the store afterwards")
    args = ap.parse_args()

    write_s = None
    if not (args.store / "traces").is_dir():
        write_s = write_store(args.store, args.rollouts, args.tokens, args.steps)
    store_bytes = sum(f.stat().st_size for f in (args.store / "traces").iterdir())
    out = args.store / "heatmap-out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", "heatmap", str(args.store), "--out", str(out), "--json"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"heatmap failed: {proc.stderr.strip()}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, largest child
    res = json.loads(proc.stdout)
    print(json.dumps({
        "rollouts": args.rollouts, "tokens_per_rollout": args.tokens, "tokens": args.rollouts * args.tokens,
        "store_mb": round(store_bytes / 2**20, 1), "write_s": None if write_s is None else round(write_s, 1),
        "heatmap_s": round(seconds, 1), "heatmap_peak_rss_mb": round(peak_kb / 1024, 1),
        "sampled_per_stage": [s["sampled"] for s in res["stages"]], "tokens_per_column": res["tokens_per_column"],
    }))
    if args.remove:
        shutil.rmtree(args.store)


if __name__ == "__main__":
    main()
