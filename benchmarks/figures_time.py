"""Time of `kat-diag figures` on a run the size of a 200-step run, built from a shorter real run.

`make figures` must finish its figures quickly on 2 cores; a 200-step run takes long to train on a
loaded machine, so this benchmark tiles a recorded run's traces and metrics `--tile` times along the
step axis (steps 0..n-1, n..2n-1, ...) into a temporary run directory, runs `kat-diag figures` on it
in a fresh process and prints one JSON line: rollouts, steps, wall-clock and CPU seconds, peak RSS.

    python benchmarks/figures_time.py runs/fig_opd --tile 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tile_run(src: Path, dst: Path, tile: int) -> tuple[int, int]:
    from kat_diag.traces.reader import TraceReader
    from kat_diag.traces.writer import TraceWriter

    reader = TraceReader(src)
    b = reader.read()
    cols = ["prompt_id", "policy", "tau", "onset", "fire", "stop_reason", "kept_len", "text", "token_ids",
            "student_logprob", "teacher_logprob", "kl", "kl_sampled", "student_entropy", "teacher_top_ids",
            "teacher_top_probs"]
    n_steps = int(b["step"].max()) + 1
    with TraceWriter(dst, config=reader.config, top_n=reader.top_n) as w:
        for k in range(tile):
            w.append({**{c: b[c] for c in cols}, "step": b["step"] + k * n_steps,
                      "correct": [None if c < 0 else bool(c) for c in b["correct"]]})
    lines = [json.loads(x) for x in (src / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tiled = [{**x, "step": x["step"] + k * n_steps} for k in range(tile) for x in lines]
    (dst / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in tiled) + "\n")
    return b.num_rows * tile, n_steps * tile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory with traces/ and metrics.jsonl")
    ap.add_argument("--tile", type=int, default=5, help="copies along the step axis")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / args.run.resolve().name
        rollouts, steps = tile_run(args.run, run, args.tile)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cli.main", "figures", str(run), "--out", str(Path(tmp) / "out")],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"figures failed: {proc.stderr.strip() or proc.stdout.strip()}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"rollouts": rollouts, "steps": steps, "figures_wall_s": round(wall, 1),
                      "figures_cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
                      "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
