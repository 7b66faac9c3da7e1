"""Throughput and memory of the trace store on a synthetic store (>= 20 M tokens by default).

Data shaped like a real run: 64 rollouts per step of 512-3584 tokens, every column filled, top-5
teacher tokens, random (hence barely compressible) ids and floats. Measured:

* write: tokens/s of ``TraceWriter.append`` + ``flush`` (wall clock; the synthetic batches are
  generated before the clock starts, so conversion, Parquet encoding, compression, disk writes and
  fsync are timed), and tokens per CPU-second of the writing process (less sensitive to other load
  on the machine);
* scan: tokens/s of ``TraceReader.iter_batches`` over the per-token ``kl`` and ``token_ids`` columns
  with a step-range filter selecting about half the store. It runs in a fresh subprocess after the
  store's pages are evicted from the page cache (``posix_fadvise(DONTNEED)``, the files are fsynced
  so their pages are clean): ``scan_tokens_per_s`` is a cold read from disk, ``scan_warm_tokens_per_s``
  the same scan again from the page cache, ``scan_all_columns_tokens_per_s`` a warm scan of every
  column (top-n included);
* memory: peak RSS (VmHWM) of that subprocess, i.e. the scan's whole process (interpreter, numpy,
  pyarrow, pandas included), its RSS before scanning, the delta, and the Arrow memory pool's peak.
  The reader holds one row group of the requested columns at a time (``row_group_tokens`` = 1 M
  tokens per row group), so the peak does not grow with the size of the store.

Prints one JSON object on its last line. Targets: write >= 2 M tokens/s, scan >= 10 M tokens/s,
scan peak memory < 1 GB whatever the store size. The temporary store is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kat_diag.traces.reader import TraceReader  # noqa: E402
from kat_diag.traces.schema import ALL_COLUMNS  # noqa: E402
from kat_diag.traces.writer import TraceWriter  # noqa: E402

TOP_N = 5


def make_step(rng: np.random.Generator, step: int, rollouts: int, mean_len: int) -> dict:
    lengths = rng.integers(mean_len // 4, mean_len * 7 // 4, rollouts)
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    def split(values: np.ndarray) -> list[np.ndarray]:
        return [values[offsets[i] : offsets[i + 1]] for i in range(rollouts)]

    # Realistic value distributions: KL is heavy-tailed and mostly small; logprobs near 0.
    kl = rng.lognormal(-3.5, 2.0, total).astype(np.float32)
    s_lp = -rng.exponential(0.3, total).astype(np.float32)
    top_probs = np.sort(rng.dirichlet(np.ones(TOP_N), total).astype(np.float32), axis=1)[:, ::-1]
    return {
        "step": step,
        "prompt_id": [f"p{step}-{i}" for i in range(rollouts)],
        "policy": "none",
        "stop_reason": "max_len",
        "text": ["x" * 64] * rollouts,
        "token_ids": split(rng.integers(0, 150_000, total, dtype=np.int32)),
        "student_logprob": split(s_lp),
        "teacher_logprob": split(s_lp - kl),
        "kl": split(kl),
        "student_entropy": split(rng.exponential(0.5, total).astype(np.float32)),
        "teacher_top_ids": split(rng.integers(0, 150_000, (total, TOP_N), dtype=np.int32)),
        "teacher_top_probs": split(np.ascontiguousarray(top_probs)),
    }


def _mem() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes.

    VmHWM from /proc is reset by exec, unlike ``ru_maxrss``, which on Linux keeps the parent's peak
    across fork + exec; fall back to ru_maxrss elsewhere.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def _scan(reader: TraceReader, first: int, last: int, columns: list[str] | None = None) -> tuple[int, int, float]:
    tokens = rollouts = 0
    t0 = time.perf_counter()
    for batch in reader.iter_batches(columns or ["kl", "token_ids"], steps=(first, last)):
        tokens += len(batch["kl"].values)
        rollouts += batch.num_rows
        float(batch["kl"].values.sum(dtype=np.float64))  # touch the data
    return tokens, rollouts, time.perf_counter() - t0


def scan_child(store: str, first: int, last: int) -> None:
    """Runs in a fresh subprocess: cold scan, warm scan, then print JSON with throughput and memory."""
    import pandas  # noqa: F401  # pyarrow imports it lazily on first use (~0.3 s): keep it off the clock
    import pyarrow as pa

    reader = TraceReader(store)
    base_rss, _ = _mem()
    # Cold: evict the store from the page cache (it was just written and fsynced, so pages are clean).
    evicted = hasattr(os, "posix_fadvise")
    for f in reader.files:
        if evicted:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    tokens, rollouts, cold = _scan(reader, first, last)
    _, _, warm = _scan(reader, first, last)
    _, peak = _mem()
    _, _, every = _scan(reader, first, last, columns=[c for c in ALL_COLUMNS if c != "text"] + ["text"])
    _, peak_every = _mem()
    print(json.dumps({
        "scan_tokens": tokens, "scan_rollouts": rollouts, "cold_seconds": cold, "warm_seconds": warm,
        "page_cache_evicted": evicted, "baseline_rss_bytes": base_rss, "peak_rss_bytes": peak,
        "all_columns_seconds": every, "all_columns_peak_rss_bytes": peak_every,
        "arrow_pool_peak_bytes": pa.default_memory_pool().max_memory(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=20e6, help="tokens in the synthetic store")
    parser.add_argument("--rollouts-per-step", type=int, default=64, help="rollouts per training step")
    parser.add_argument("--mean-len", type=int, default=2048, help="mean rollout length in tokens")
    parser.add_argument("--flush-every-steps", type=int, default=8, help="steps between flushes")
    parser.add_argument("--compression", default="snappy", help="Parquet codec of the writer")
    parser.add_argument("--dir", default=None, help="parent dir of the temporary store")
    parser.add_argument("--scan-child", nargs=3, metavar=("STORE", "FIRST", "LAST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scan_child:
        scan_child(args.scan_child[0], int(args.scan_child[1]), int(args.scan_child[2]))
        return

    rng = np.random.default_rng(0)
    tokens_per_step = args.rollouts_per_step * args.mean_len
    n_steps = int(np.ceil(args.tokens / tokens_per_step))
    # A pool of distinct steps reused with new step numbers keeps generation time and memory small.
    pool = [make_step(rng, 0, args.rollouts_per_step, args.mean_len) for _ in range(8)]
    tmp = tempfile.mkdtemp(prefix="kat-trace-bench-", dir=args.dir)
    try:
        written = 0
        write_time = 0.0
        cpu0 = time.process_time()
        with TraceWriter(tmp, rank=0, run_name="bench", compression=args.compression) as writer:
            for step in range(n_steps):
                batch = dict(pool[step % len(pool)], step=step)
                t0 = time.perf_counter()
                writer.append(batch)
                if (step + 1) % args.flush_every_steps == 0:
                    writer.flush()
                write_time += time.perf_counter() - t0
                written += sum(len(a) for a in batch["kl"])
            t0 = time.perf_counter()
            writer.flush()
            write_time += time.perf_counter() - t0
        # process CPU over the write loop (only append/flush run in it besides dict copies)
        write_cpu = time.process_time() - cpu0
        store_bytes = sum(p.stat().st_size for p in Path(tmp, "traces").iterdir())
        first, last = n_steps // 4, n_steps // 4 + n_steps // 2 - 1
        out = subprocess.run(
            [sys.executable, __file__, "--scan-child", tmp, str(first), str(last)],
            check=True, capture_output=True, text=True,
        )
        scan = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "traces",
        "tokens_written": written,
        "rollouts_written": n_steps * args.rollouts_per_step,
        "files": len(writer.files_written),
        "store_bytes": store_bytes,
        "bytes_per_token": store_bytes / written,
        "write_seconds": write_time,
        "write_tokens_per_s": written / write_time,
        "write_tokens_per_cpu_s": written / write_cpu,
        "scan_columns": ["kl", "token_ids"],
        "scan_filter": f"steps {first}..{last} of 0..{n_steps - 1}",
        "scan_tokens": scan["scan_tokens"],
        "scan_rollouts": scan["scan_rollouts"],
        "scan_cold_seconds": scan["cold_seconds"],
        "scan_tokens_per_s": scan["scan_tokens"] / scan["cold_seconds"],
        "scan_warm_tokens_per_s": scan["scan_tokens"] / scan["warm_seconds"],
        "scan_page_cache_evicted": scan["page_cache_evicted"],
        "scan_all_columns_tokens_per_s": scan["scan_tokens"] / scan["all_columns_seconds"],
        "scan_all_columns_peak_rss_bytes": scan["all_columns_peak_rss_bytes"],
        "scan_peak_rss_bytes": scan["peak_rss_bytes"],
        "scan_baseline_rss_bytes": scan["baseline_rss_bytes"],
        "scan_rss_delta_bytes": scan["peak_rss_bytes"] - scan["baseline_rss_bytes"],
        "scan_arrow_pool_peak_bytes": scan["arrow_pool_peak_bytes"],
        "compression": args.compression,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "targets": {"write_tokens_per_s": 2e6, "scan_tokens_per_s": 1e7, "scan_peak_rss_bytes": 1 << 30},
    }
    result["meets_targets"] = bool(
        result["write_tokens_per_s"] >= 2e6 and result["scan_tokens_per_s"] >= 1e7
        and result["scan_peak_rss_bytes"] < 1 << 30
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
