"""Throughput of the KAT detector: token updates per second for a batch of 64 rollouts.

The rollout engine calls the detector after every decoding step (chunk 1) or after scoring a
chunk of tokens with the teacher (chunk W), so its per-call cost is overhead on every step. This
prints one line per scenario and, last, one JSON object with the best and the median of several
repeats (the machine is shared: the median is the figure to quote), on CPU with 2 threads.

`step_<preset>_<statistic>` cases time what the detector costs per training step under each
threshold statistic: the updates of 64 rollouts of 1024 tokens at chunk W (world preset W = 16,
paper preset W = 64), then the end of the step: the step's buffer values (`rollout_min`: one
minimum per rollout; `windows`: stride-W window means) from the stored KL, the FIFO and the next
threshold. `policy_step_...` runs the same through `KATPolicy`, whose per-row bookkeeping (torch)
comes on top.

Run: .venv/bin/python benchmarks/detector.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from kat_diag.kat.config import KATConfig, kat_preset
from kat_diag.kat.detector import StreamingDetector
from kat_diag.kat.policies import KATPolicy
from kat_diag.kat.replay import replay

BATCH = 64


def rate(update, tokens_per_call: int, calls: int, repeats: int) -> tuple[float, float]:
    """(best, median) token updates per second over `repeats` timed loops of `calls` calls."""
    for _ in range(min(calls, 50)):
        update()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            update()
        rates.append(tokens_per_call * calls / (time.perf_counter() - t0))
    return max(rates), statistics.median(rates)


def detector_case(cfg: KATConfig, chunk: int, backend: str, valid: str, calls: int, repeats: int
                  ) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    kl = torch.tensor(rng.exponential(0.05, size=(BATCH, chunk)), dtype=torch.float32)
    det = StreamingDetector(cfg, BATCH, backend=backend)
    det.set_tau(0.03)
    mask = None
    if valid == "all":
        mask = torch.ones(BATCH, chunk, dtype=torch.bool)
    elif valid == "ragged":  # a quarter of the rows end halfway through the chunk
        mask = torch.ones(BATCH, chunk, dtype=torch.bool)
        mask[: BATCH // 4, chunk // 2:] = False

    return rate(lambda: det.update(kl, mask), BATCH * chunk, calls, repeats)


def policy_case(cfg: KATConfig, chunk: int, calls: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    kl = torch.tensor(rng.exponential(0.05, size=(BATCH, chunk)), dtype=torch.float32)
    valid = torch.ones(BATCH, chunk, dtype=torch.bool)
    policy = KATPolicy(cfg)
    policy.threshold.observe([0.03] * cfg.min_fill)
    policy.begin_step(cfg.warmup_steps)
    policy.add_rows(BATCH)
    return rate(lambda: policy.update(kl, valid), BATCH * chunk, calls, repeats)


def step_case(cfg: KATConfig, statistic: str, length: int, steps: int, repeats: int, policy: bool
              ) -> tuple[float, float]:
    """Whole KAT steps in token updates/s: the detector's updates at chunk W plus the end of the step
    (the buffer values of the step's rollouts under `statistic`, the FIFO, the next threshold).
    policy=True runs the same through `KATPolicy` (adds its per-row bookkeeping)."""
    import dataclasses

    from kat_diag.kat.detector import AdaptiveThreshold, buffer_values_of

    cfg = dataclasses.replace(cfg, statistic=statistic)
    rng = np.random.default_rng(0)
    kl = torch.tensor(rng.exponential(0.05, size=(BATCH, length)), dtype=torch.float32)
    rows = list(kl)
    w = cfg.window
    if policy:
        pol = KATPolicy(cfg)
        pol.threshold.observe([1e-9] * cfg.min_fill)  # active, but nothing fires: full-length rollouts

        def one_step() -> None:
            pol.begin_step(cfg.warmup_steps)
            pol.add_rows(BATCH)
            for c0 in range(0, length, w):
                pol.update(kl[:, c0: c0 + w])
            pol.end_step(rows)
    else:
        thr = AdaptiveThreshold(cfg)
        thr.observe([1e-9] * cfg.min_fill)

        def one_step() -> None:
            det = StreamingDetector(cfg, BATCH)
            det.set_tau(thr.begin_step(cfg.warmup_steps))
            for c0 in range(0, length, w):
                det.update(kl[:, c0: c0 + w])
            thr.observe(buffer_values_of(rows, cfg))

    return rate(one_step, BATCH * length, steps, repeats)


def replay_case(cfg: KATConfig, n_tokens: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 2048, size=n_tokens // 1024)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.exponential(0.05, size=int(offsets[-1])).astype(np.float32)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        replay(values, offsets, cfg, 0.03)
        best = max(best, values.size / (time.perf_counter() - t0))
    return best


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(2)
    cfg = KATConfig()
    w = cfg.window
    repeats = 3 if quick else 7
    scale = 0.2 if quick else 1.0
    out: dict[str, object] = {"batch": BATCH, "config": {
        "W": cfg.window, "T": cfg.persistence, "L0": cfg.min_length, "K": cfg.warmup_steps,
        "B": cfg.buffer_size, "B_min": cfg.min_fill, "tau_quantile": cfg.tau_quantile,
        "statistic": cfg.statistic, "keep": cfg.keep}}
    cases = [
        ("chunk1", 1, "auto", "none", 4000),
        ("chunkW", w, "auto", "none", 2000),
        ("chunkW_valid_all", w, "auto", "all", 2000),
        ("chunkW_valid_ragged", w, "auto", "ragged", 2000),
        ("chunk4W", 4 * w, "auto", "none", 1000),
        ("chunk1_torch", 1, "torch", "none", 2000),
        ("chunkW_torch", w, "torch", "none", 1000),
    ]
    for name, chunk, backend, valid, calls in cases:
        best, median = detector_case(cfg, chunk, backend, valid, int(calls * scale), repeats)
        out[f"token_updates_per_s_{name}"] = round(best)
        out[f"token_updates_per_s_{name}_median"] = round(median)
        print(f"{name:22s} best {best / 1e6:7.2f} M/s   median {median / 1e6:7.2f} M/s", flush=True)
    best, median = policy_case(cfg, w, int(1000 * scale), repeats)
    out["token_updates_per_s_policy_chunkW"] = round(best)
    out["token_updates_per_s_policy_chunkW_median"] = round(median)
    print(f"{'policy_chunkW':22s} best {best / 1e6:7.2f} M/s   median {median / 1e6:7.2f} M/s")
    for preset in ("world", "paper"):  # chunk W = 16 and 64
        for statistic in ("rollout_min", "windows"):
            for pol in (False, True):
                name = f"{'policy_' if pol else ''}step_{preset}_{statistic}"
                best, median = step_case(kat_preset(preset), statistic, 1024, int(10 * scale) or 2, repeats, pol)
                out[f"token_updates_per_s_{name}"] = round(best)
                out[f"token_updates_per_s_{name}_median"] = round(median)
                print(f"{name:29s} best {best / 1e6:7.2f} M/s   median {median / 1e6:7.2f} M/s", flush=True)
    tokens = 1 << 20 if quick else 1 << 22
    out["replay_tokens_per_s"] = round(replay_case(cfg, tokens, 2 if quick else 3))
    out["replay_tokens"] = tokens
    print(f"{'replay':22s} best {out['replay_tokens_per_s'] / 1e6:7.2f} M/s on {tokens} tokens")
    out["backend_auto"] = StreamingDetector(cfg).backend
    out["torch_threads"] = torch.get_num_threads()
    out["loadavg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
