"""The paper's KAT rule (docs/kat.md) over whole training-step sequences, against a plain-Python loop.

The reference below is written straight from docs/kat.md, with no library code: a running window sum
per token, a counter of consecutive low windows, the cut back to onset, the buffer fed after each
step with what the stored (cut) rollouts contribute, the FIFO, K and B_min. The library side is the
real `KATPolicy` driven the way the rollout engine drives it (chunks, compaction, refill into
`slots` < batch, tokens past a fire discarded), at several chunk sizes, for both statistics.
"""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kat_diag.kat.config import KATConfig, kat_preset
from kat_diag.kat.detector import buffer_values, rollout_minima, threshold_of
from kat_diag.kat.policies import KATPolicy

SCALE = 2**24  # the detector's fixed point (docs/kat.md: exact window sums)


def reference_run(steps: list[list[list[float]]], cfg: KATConfig) -> list[dict]:
    """Per step: the threshold in force (NaN: inactive) and per rollout (fire, stored length)."""
    w, t_need, l0 = cfg.window, cfg.persistence, cfg.min_length
    buf: deque[float] = deque()
    out = []
    for step, traces in enumerate(steps):
        enough = len(buf) >= cfg.min_fill
        s = float(np.quantile(np.array(buf, dtype=np.float64), cfg.tau_quantile)) if enough else math.nan
        active = step >= cfg.warmup_steps and enough
        thr = s if active else math.nan
        fires, lengths, contrib = [], [], []
        for d in traces:
            q = [int(v * SCALE) if math.isfinite(v) and abs(v) <= 1024 else None for v in d]
            total, bad, counter, fire = 0, 0, 0, -1
            sums: list[tuple[int, int]] = []  # (end position, window sum) of usable windows
            for i, x in enumerate(q):
                total += 0 if x is None else x
                bad += x is None
                if i >= w:  # the value leaving the window
                    total -= 0 if q[i - w] is None else q[i - w]
                    bad -= q[i - w] is None
                low = False
                if i >= w - 1 and bad == 0:
                    sums.append((i, total))
                    low = active and Fraction(total, w * SCALE) < Fraction(thr)
                counter = counter + 1 if low else 0
                if counter >= t_need and i + 1 >= l0:
                    fire = i
                    break  # nothing after the cut is generated, stored or pushed
            fires.append(fire)
            lengths.append(fire + 1 if fire >= 0 else len(d))
            if cfg.statistic == "rollout_min":
                if sums:
                    contrib.append(min(s_ for _, s_ in sums) / (w * SCALE))
            else:
                contrib += [s_ / (w * SCALE) for i, s_ in sums if (i + 1) % w == 0]
        for v in contrib:
            buf.append(v)
            if len(buf) > cfg.buffer_size:
                buf.popleft()
        out.append({"tau": thr, "fire": fires, "length": lengths, "buffer": list(buf)})
    return out


def engine_run(steps: list[list[list[float]]], cfg: KATConfig, chunk: int, slots: int) -> list[dict]:
    """KATPolicy driven like the rollout engine: chunked, compacted, refilled, truncated at stop."""
    policy = KATPolicy(cfg)
    out = []
    for step, traces in enumerate(steps):
        policy.begin_step(step)
        stored: list[list[float]] = [[] for _ in traces]
        fire = [-1] * len(traces)
        live: list[int] = []
        pos: list[int] = []
        waiting = list(range(len(traces)))
        while waiting or live:
            n_new = min(slots - len(live), len(waiting))
            policy.add_rows(n_new)
            live, pos, waiting = live + waiting[:n_new], pos + [0] * n_new, waiting[n_new:]
            kl_BC = torch.zeros(len(live), chunk, dtype=torch.float64)
            valid_BC = torch.zeros(len(live), chunk, dtype=torch.bool)
            for r, (rid, p) in enumerate(zip(live, pos, strict=True)):
                k = min(chunk, len(traces[rid]) - p)
                kl_BC[r, :k] = torch.tensor(traces[rid][p: p + k], dtype=torch.float64)
                valid_BC[r, :k] = True
            dec = policy.update(kl_BC, valid_BC)
            info = policy.row_info()
            keep_rows = []
            for r, rid in enumerate(live):
                p = pos[r] + int(valid_BC[r].sum())
                if dec.stop_B[r]:
                    stored[rid] = traces[rid][: int(dec.end_B[r])]
                    fire[rid] = int(info["fire"][r])
                elif p >= len(traces[rid]):
                    stored[rid] = traces[rid]
                else:
                    keep_rows.append(r)
                pos[r] = p
            policy.keep_rows(torch.tensor(keep_rows, dtype=torch.int64))
            live, pos = [live[r] for r in keep_rows], [pos[r] for r in keep_rows]
        metrics = policy.end_step([torch.tensor(s, dtype=torch.float64) for s in stored])
        out.append({"tau": metrics["tau"], "fire": fire, "length": [len(s) for s in stored],
                    "buffer": policy.threshold.buffer.tolist()})
    return out


def same_tau(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


VALUES = st.sampled_from([0.01, 0.0, 0.002, 0.004, 1.0, 0.3, 5.0, math.nan, math.inf, 2000.0])
TRACE = st.lists(st.tuples(VALUES, st.integers(1, 12)), max_size=6).map(
    lambda runs: [v for v, k in runs for _ in range(k)])
STEPS = st.lists(st.lists(TRACE, min_size=1, max_size=5), min_size=1, max_size=4)


@st.composite
def configs(draw) -> KATConfig:
    buffer_size = draw(st.integers(1, 6))
    return KATConfig(window=draw(st.integers(1, 5)), persistence=draw(st.integers(1, 4)),
                     min_length=draw(st.integers(0, 20)), warmup_steps=draw(st.integers(0, 2)),
                     buffer_size=buffer_size, min_fill=draw(st.integers(1, buffer_size)),
                     tau_quantile=draw(st.sampled_from([0.3, 0.5, 0.7, 0.9])),
                     statistic=draw(st.sampled_from(["rollout_min", "windows"])),
                     keep=draw(st.sampled_from(["onset", "fire"])))


@settings(max_examples=150, deadline=None)
@given(cfg=configs(), steps=STEPS, slots=st.integers(1, 4))
def test_engine_driven_policy_equals_the_reference_at_every_chunk_size(cfg, steps, slots):
    expected = reference_run(steps, cfg)
    for chunk in sorted({1, 3, cfg.window, 16, 64}):
        got = engine_run(steps, cfg, chunk, slots)
        for e, g in zip(expected, got, strict=True):
            assert same_tau(e["tau"], g["tau"]), (chunk, e["tau"], g["tau"])
            assert g["fire"] == e["fire"] and g["length"] == e["length"], chunk
            assert g["buffer"] == e["buffer"], chunk


def test_chunk_size_no_longer_moves_the_threshold():
    """The independent check's case (W=4, T=1, K=1, tau_quantile 0.5 of window means): tau at step 2
    was 1.0 / 0.75 / 0.5 at chunk sizes 1 / 4 / 16, because tokens generated after a fire fed the
    buffer. Only stored tokens count now: one value for every chunk size."""
    cfg = KATConfig(window=4, persistence=1, min_length=0, warmup_steps=1, buffer_size=64, min_fill=1,
                    tau_quantile=0.5, statistic="windows")
    trace = [1.0] * 8 + [0.25] * 8 + [0.5] * 16
    steps = [[trace] * 2, [trace] * 2, [trace] * 2]
    taus = {chunk: [s["tau"] for s in engine_run(steps, cfg, chunk, slots=1)] for chunk in (1, 4, 16)}
    assert len({str(v) for v in taus.values()}) == 1
    ref = [s["tau"] for s in reference_run(steps, cfg)]
    assert all(same_tau(a, b) for a, b in zip(taus[1], ref, strict=True))
    assert math.isnan(ref[0]) and ref[1] == 0.5  # step 1: median of [1, 1, 0.25, 0.25, 0.5 x 4] x 2


def test_rollout_minima_and_buffer_values_on_planted_traces():
    kl = np.array([0.5, 0.25, 0.0, 1.0,  # windows (W=2): 0.375, 0.125, 0.5
                   2.0, np.nan, 0.125, 0.125, 0.125,  # first two windows unusable
                   0.3,  # shorter than W: no window
                   np.inf, 5.0], dtype=np.float64)  # only an unusable window
    offsets = np.array([0, 4, 4, 9, 10, 12])
    m = rollout_minima(kl, offsets, 2)
    assert m[0] == 0.125 and math.isnan(m[1]) and m[2] == 0.125 and math.isnan(m[3]) and math.isnan(m[4])
    paper = KATConfig(window=2, min_fill=1)
    assert buffer_values(kl, offsets, paper).tolist() == [0.125, 0.125]
    windows = KATConfig(window=2, min_fill=1, statistic="windows")
    assert buffer_values(kl, offsets, windows).tolist() == [0.375, 0.5, 0.125]  # i = 1, 3 / i = 3


def test_threshold_of_needs_min_fill_values():
    cfg = KATConfig(buffer_size=8, min_fill=3, tau_quantile=0.7)
    assert math.isnan(threshold_of([0.1, 0.2], cfg))
    assert math.isnan(threshold_of([0.1, 0.2, math.nan], cfg))  # non-finite values do not count
    assert threshold_of([0.1, 0.2, 0.3], cfg) == pytest.approx(0.24)


def test_presets_and_overrides():
    paper = kat_preset("paper")
    assert (paper.window, paper.persistence, paper.warmup_steps, paper.buffer_size, paper.min_fill,
            paper.tau_quantile, paper.statistic) == (64, 4, 50, 4096, 512, 0.7, "rollout_min")
    assert kat_preset("paper", window=32, persistence=None).window == 32
    assert kat_preset("paper", window=32).persistence == 4
    with pytest.raises(ValueError, match="unknown KAT preset 'papr'"):
        kat_preset("papr")
    with pytest.raises(ValueError, match="B_min <= B"):
        kat_preset("paper", min_fill=5000)
