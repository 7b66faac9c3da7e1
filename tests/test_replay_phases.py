"""Offline replay reproduces online decisions exactly; phases partition every rollout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import KL_SCALE
from kat_diag.kat.phases import AGREEMENT, POST, PRE, phase_labels, phase_of, segment
from kat_diag.kat.policies import KATPolicy
from kat_diag.kat.replay import replay

VALUES = st.sampled_from([0.01, 0.0, 0.002, 1.0, 0.3, 5.0, math.nan, math.inf])
TRACE = st.lists(st.tuples(VALUES, st.integers(1, 12)), max_size=8).map(
    lambda runs: [v for v, k in runs for _ in range(k)])
CONFIGS = st.builds(KATConfig, window=st.integers(1, 5), persistence=st.integers(1, 4),
                    min_length=st.integers(0, 20), keep=st.sampled_from(["onset", "fire"]),
                    warmup_steps=st.just(0), min_fill=st.just(1))


def ragged(traces: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in traces])]).astype(np.int64)
    values = np.array([v for t in traces for v in t], dtype=np.float32)
    return values, offsets


def window_low(d: list[float], cfg: KATConfig, tau: float) -> list[bool]:
    """Reference: is the window ending at each token low?"""
    w = cfg.window
    q = [int(v * KL_SCALE) if math.isfinite(v) and abs(v) <= 1024 else None for v in d]
    out = []
    for i in range(len(d)):
        win = q[max(0, i - w + 1): i + 1]
        out.append(i >= w - 1 and all(x is not None for x in win) and sum(win) < tau * (w * KL_SCALE))
    return out


def run_online(traces: list[list[float]], cfg: KATConfig, tau: float, chunk: int, slots: int
               ) -> tuple[dict[int, tuple[int, int, int]], list[list[float]]]:
    """Engine-like online run through KATPolicy: chunked, compacted, refilled, truncated at stop.
    Returns per rollout (end, keep, stopped) and the recorded (truncated) traces."""
    policy = KATPolicy(cfg)
    policy.threshold.observe([tau] * 3)
    policy.begin_step(0)  # warm-up 0: tau = the buffer's quantile = tau
    assert policy.threshold.tau == pytest.approx(tau) or math.isnan(tau)
    results: dict[int, tuple[int, int, int]] = {}
    recorded: list[list[float]] = [[] for _ in traces]
    live: list[int] = []
    pos: list[int] = []
    waiting = list(range(len(traces)))
    while waiting or live:
        n_new = min(slots - len(live), len(waiting))
        policy.add_rows(n_new)
        live, pos, waiting = live + waiting[:n_new], pos + [0] * n_new, waiting[n_new:]
        kl_BC = torch.zeros(len(live), chunk)
        valid_BC = torch.zeros(len(live), chunk, dtype=torch.bool)
        for r, (rid, p) in enumerate(zip(live, pos, strict=True)):
            k = min(chunk, len(traces[rid]) - p)
            kl_BC[r, :k] = torch.tensor(traces[rid][p: p + k])
            valid_BC[r, :k] = True
        dec = policy.update(kl_BC, valid_BC)
        keep_rows = []
        for r, rid in enumerate(live):
            p = pos[r] + int(valid_BC[r].sum())
            if dec.stop_B[r]:
                end = int(dec.end_B[r])
                recorded[rid] = traces[rid][:end]  # the engine discards tokens past the stop
                results[rid] = (end, int(dec.keep_B[r]), 1)
            elif p >= len(traces[rid]):
                recorded[rid] = traces[rid]
                results[rid] = (p, p, 0)
            else:
                keep_rows.append(r)
            pos[r] = p
        policy.keep_rows(torch.tensor(keep_rows, dtype=torch.int64))
        live, pos = [live[r] for r in keep_rows], [pos[r] for r in keep_rows]
    policy.end_step([torch.tensor(r) for r in recorded])
    return results, recorded


@settings(max_examples=60, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=6),
       tau=st.sampled_from([0.05, 0.1, 0.5, 2.0]), chunk=st.integers(1, 20), slots=st.integers(1, 4))
def test_online_equals_offline_replay(cfg, traces, tau, chunk, slots):
    online, recorded = run_online(traces, cfg, tau, chunk, slots)
    # Replay of what the trace store would hold (truncated at the stop) ...
    res = replay(*ragged(recorded), cfg, tau)
    for rid in range(len(traces)):
        end, keep, stopped = online[rid]
        assert bool(res.fired[rid]) == bool(stopped)
        assert res.length[rid] == end and res.keep[rid] == keep
        if stopped:
            assert res.fire[rid] == end - 1 and res.onset[rid] == res.fire[rid] - cfg.fire_lag
    # ... and of the full, untruncated traces give the same fire positions.
    full = replay(*ragged(traces), cfg, tau)
    np.testing.assert_array_equal(full.fire, res.fire)


@settings(max_examples=40, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=8),
       taus=st.lists(st.sampled_from([0.05, 0.5, math.nan]), min_size=8, max_size=8),
       block=st.integers(1, 64))
def test_replay_blocks_and_per_rollout_tau(cfg, traces, taus, block):
    values, offsets = ragged(traces)
    tau = np.array(taus[: len(traces)])
    small = replay(values, offsets, cfg, tau, max_block_tokens=block, return_low=True)
    big = replay(values.astype(np.float64), offsets, cfg, tau, return_low=True)
    for field in ("onset", "fire", "keep", "length", "low"):
        np.testing.assert_array_equal(getattr(small, field), getattr(big, field))
    assert not small.fired[np.isnan(tau)].any()  # NaN tau = inactive (warm-up)
    for k, t in enumerate(traces):
        expected = window_low(t, cfg, tau[k]) if not math.isnan(tau[k]) else [False] * len(t)
        assert small.low[offsets[k]: offsets[k + 1]].tolist() == expected


@settings(max_examples=60, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=6), tau=st.sampled_from([0.05, 0.5, 2.0]))
def test_phases_partition_every_rollout(cfg, traces, tau):
    values, offsets = ragged(traces)
    ph = segment(values, offsets, cfg, tau)
    labels = phase_of(ph, offsets)
    assert labels.shape == values.shape
    assert np.all((0 <= ph.pre_end) & (ph.pre_end <= ph.agree_end) & (ph.agree_end <= ph.length))
    for k, t in enumerate(traces):
        lab = labels[offsets[k]: offsets[k + 1]]
        assert np.all(np.diff(lab) >= 0)  # pre, then agreement, then post
        assert (lab == PRE).sum() == ph.pre_end[k]
        assert (lab == AGREEMENT).sum() == ph.agree_end[k] - ph.pre_end[k]
        assert (lab == POST).sum() == ph.length[k] - ph.agree_end[k]
        if ph.fire[k] < 0:
            assert ph.pre_end[k] == ph.agree_end[k] == len(t)
            continue
        low = window_low(t, cfg, tau)
        assert ph.pre_end[k] == ph.onset[k] == ph.fire[k] - cfg.fire_lag
        j = ph.agree_end[k]
        assert all(low[ph.fire[k]: j])  # agreement: windows stay low from fire ...
        assert j == len(t) or not low[j]  # ... up to the first window that is not


def test_phases_on_a_concrete_trace():
    cfg = KATConfig(window=2, persistence=2, min_length=0)
    trace = [1.0] * 5 + [0.0] * 6 + [1.0] * 3  # low windows i = 6..10, fire 7, onset 5
    values, offsets = ragged([trace, [1.0] * 4, []])
    ph = segment(values, offsets, cfg, 0.1)
    assert ph.fire.tolist() == [7, -1, -1] and ph.onset.tolist() == [5, -1, -1]
    assert ph.pre_end.tolist() == [5, 4, 0] and ph.agree_end.tolist() == [11, 4, 0]
    assert phase_labels(offsets, ph.pre_end, ph.agree_end).tolist() == (
        [0] * 5 + [1] * 6 + [2] * 3 + [0] * 4)


def test_replay_handles_empty_and_degenerate_input():
    cfg = KATConfig(window=4, persistence=2, min_length=0)
    res = replay(np.zeros(0, np.float32), np.array([0], np.int64), cfg, 0.1)
    assert res.fire.shape == (0,)
    res = replay(np.zeros(0, np.float32), np.array([0, 0, 0], np.int64), cfg, 0.1)
    assert res.fire.tolist() == [-1, -1] and res.keep.tolist() == [0, 0]
    res = replay(np.zeros(3, np.float32), np.array([0, 3], np.int64), cfg, 0.1)
    assert res.fire.tolist() == [-1]  # shorter than W: never fires
    res = replay(np.zeros(10), np.array([0, 10]), cfg, math.nan)
    assert res.fire.tolist() == [-1]  # tau undefined: never fires


@pytest.mark.parametrize(("values", "offsets", "match"), [
    (np.zeros((2, 2)), np.array([0, 4]), "1-D"),
    (np.zeros(4), np.array([0, 5]), "offsets"),
    (np.zeros(4), np.array([0, 3, 2]), "non-decreasing"),
    (np.zeros(4), np.array([0.0, 4.0]), "integers"),
])
def test_replay_rejects_bad_layout(values, offsets, match):
    with pytest.raises(ValueError, match=match):
        replay(values, offsets, KATConfig(), 0.1)


def test_replay_scales_to_many_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 600, size=1000)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.exponential(0.05, size=int(offsets[-1])).astype(np.float32)
    values[rng.integers(0, values.size, 50)] = np.nan
    cfg = KATConfig(window=8, persistence=4, min_length=16)
    res = replay(values, offsets, cfg, 0.04, max_block_tokens=1 << 16)
    assert 0 < res.fired.sum() < len(lengths)
    # Spot-check against the per-rollout streaming path.
    for k in range(0, 1000, 97):
        one = replay(values[offsets[k]: offsets[k + 1]], np.array([0, lengths[k]]), cfg, 0.04)
        assert one.fire[0] == res.fire[k]
