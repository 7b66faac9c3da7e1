"""A tour of the public API on the embedded world: train with KAT, read the store, replay offline.

Everything a script needs is importable from `kat_diag` (docs/api.md). This trains a few KAT steps
from the committed world's student (a short warm-up and a small buffer minimum so KAT is active
within the run), reads the trace store back, replays the detector on the recorded KL at each
rollout's recorded threshold, and checks that the replay takes exactly the online decisions.
Prints one JSON object. Takes about a minute on 2 CPU cores:

    python examples/api_tour.py [--out runs/api-tour]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from kat_diag import SamplingConfig, TraceReader, TrainConfig, kat_preset, replay, segment, train
from kat_diag.world.paths import DEFAULT_WORLD_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/api-tour", help="run directory (replaced if it exists)")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)

    kat = kat_preset("world", warmup_steps=2, min_fill=8)  # active from step 2 in this short run
    cfg = TrainConfig(teacher=str(DEFAULT_WORLD_DIR / "teacher"), student=str(DEFAULT_WORLD_DIR / "student"),
                      out=args.out, steps=6, batch_size=16, micro_batch=16, termination="kat", kat=kat,
                      sampling=SamplingConfig(max_new_tokens=160, chunk_size=16), eval_n=8, eval_k=1,
                      progress=False)
    result = train(cfg)

    reader = TraceReader(Path(args.out))
    b = reader.read(["step", "kl", "tau", "fire", "onset", "kept_len"])
    kl = b["kl"]
    again = replay(kl.values, kl.offsets, kat, b["tau"])  # NaN tau (warm-up) never fires
    phases = segment(kl.values, kl.offsets, kat, b["tau"])
    fired = b["fire"] >= 0
    print(json.dumps({
        "rollouts": int(reader.num_rows),
        "fired_share": float(fired.mean()),
        "mean_kept_len": float(np.mean(b["kept_len"])),
        "replay_matches_online": bool(np.array_equal(again.fire, b["fire"])
                                      and np.array_equal(again.onset, b["onset"])),
        "agreement_tokens_of_fired": int((phases.agree_end - phases.pre_end)[fired].sum()),
        "last_step_loss": result.metrics.get("loss"),
    }))


if __name__ == "__main__":
    main()
