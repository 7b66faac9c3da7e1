"""The paper's KAT rule (docs/kat.md) over whole training-step sequences, against a plain-Python loop.

The reference below is written straight from docs/kat.md, with no library code: a running window sum
per token, a counter of consecutive low windows, the cut back to onset, the buffer fed after each
step with what the stored (cut) rollouts contribute, the FIFO, K and B_min. The library side is the
real `KATPolicy` driven the way the rollout engine drives it (chunks, compaction, refill into
`slots` < batch, tokens past a fire discarded), at several chunk sizes, for both statistics.
"""

from __future__ import annotations

import math
import warnings
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
from kat_diag.kat.replay import replay

SCALE = 2**24  # the detector's fixed point (docs/kat.md: exact window sums)


def exact_quantile(buf: list[Fraction], q: float) -> Fraction:
    """numpy's linear-interpolation quantile, in exact arithmetic (index (n - 1) q, q the given float)."""
    v = sorted(buf)
    h = (len(v) - 1) * Fraction(q)
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def reference_run(steps: list[list[list[float]]], cfg: KATConfig) -> list[dict]:
    """Per step: the threshold in force (exact Fraction; NaN: inactive) and per rollout (fire,
    stored length). Window means and the buffer are exact fractions: no float rounding anywhere."""
    w, t_need, l0 = cfg.window, cfg.persistence, cfg.min_length
    buf: deque[Fraction] = deque()
    out = []
    for step, traces in enumerate(steps):
        enough = len(buf) >= cfg.min_fill
        s = exact_quantile(list(buf), cfg.tau_quantile) if enough else math.nan
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
                    low = active and Fraction(total, w * SCALE) < thr
                counter = counter + 1 if low else 0
                if counter >= t_need and i + 1 >= l0:
                    fire = i
                    break  # nothing after the cut is generated, stored or pushed
            fires.append(fire)
            lengths.append(fire + 1 if fire >= 0 else len(d))
            if cfg.statistic == "rollout_min":
                if sums:
                    contrib.append(Fraction(min(s_ for _, s_ in sums), w * SCALE))
            else:
                contrib += [Fraction(s_, w * SCALE) for i, s_ in sums if (i + 1) % w == 0]
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


def same_tau(exact: Fraction | float, got: float, window: int) -> bool:
    """The library's float tau stands for the exact one: within a few ulps, and the detector reads
    it as the same threshold (ceil(tau W 2**24): the integer window sums below it)."""
    if isinstance(exact, float):
        return math.isnan(exact) and math.isnan(got)
    if math.isnan(got):
        return False
    denom = window * SCALE
    return (math.ceil(Fraction(got) * denom) == math.ceil(exact * denom)
            and abs(Fraction(got) - exact) <= 4 * Fraction(math.ulp(float(exact))))


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


@pytest.mark.filterwarnings("ignore::kat_diag.kat.detector.KATResolutionWarning")  # exact zeros: tau 0
@settings(max_examples=150, deadline=None)
@given(cfg=configs(), steps=STEPS, slots=st.integers(1, 4))
def test_engine_driven_policy_equals_the_reference_at_every_chunk_size(cfg, steps, slots):
    expected = reference_run(steps, cfg)
    for chunk in sorted({1, 3, cfg.window, 16, 64}):
        got = engine_run(steps, cfg, chunk, slots)
        for e, g in zip(expected, got, strict=True):
            assert same_tau(e["tau"], g["tau"], cfg.window), (chunk, e["tau"], g["tau"])
            assert g["fire"] == e["fire"] and g["length"] == e["length"], chunk
            assert g["buffer"] == [float(v) for v in e["buffer"]], chunk


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
    assert all(same_tau(a, b, cfg.window) for a, b in zip(ref, taus[1], strict=True))
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


def test_a_window_mean_equal_to_the_threshold_is_not_low_when_w_is_not_a_power_of_two():
    """M1 (issue 23): W = 3, a window mean of exactly 7/24 in the buffer; float64(7/24) is above
    7/24, so comparing the same window with the stored float used to call it low and fire. DESIGN
    §2 says strictly below: it must not fire (the reference, in exact arithmetic, agrees)."""
    cfg = KATConfig(window=3, persistence=1, min_length=0, warmup_steps=1, buffer_size=4, min_fill=1)
    trace = [0.25, 0.25, 0.375]  # one window, mean 7/24 exactly (dyadic tokens: no quantisation)
    assert Fraction(float(Fraction(7, 24))) > Fraction(7, 24)  # the case is the rounding-up one
    steps = [[trace], [trace]]
    ref = reference_run(steps, cfg)
    assert ref[1]["tau"] == Fraction(7, 24) and ref[1]["fire"] == [-1]
    for chunk in (1, 3):
        got = engine_run(steps, cfg, chunk, slots=1)
        assert got[1]["fire"] == [-1], chunk
        assert same_tau(ref[1]["tau"], got[1]["tau"], cfg.window)
    # Offline replay at the same tau agrees, and one window sum below it is low.
    tau = threshold_of([float(Fraction(7, 24))], cfg)
    assert replay(np.array(trace), np.array([0, 3]), cfg, tau).fire.tolist() == [-1]
    below = [0.25, 0.25, 0.375 - 2**-24]
    assert replay(np.array(below), np.array([0, 3]), cfg, tau).fire.tolist() == [2]


@settings(max_examples=300, deadline=None)
@given(k=st.lists(st.integers(0, 2**30), min_size=1, max_size=7), w=st.sampled_from([3, 5, 6, 7, 12]),
       q=st.sampled_from([0.3, 0.5, 0.7, 0.9]))
def test_threshold_of_decides_exactly_as_the_exact_quantile(k, w, q):
    """threshold_of over window means k / (W 2**24) decides every integer window sum s exactly as
    s / (W 2**24) < the exact quantile does, and stays within a few ulps of it."""
    denom = w * SCALE
    exact = exact_quantile([Fraction(x, denom) for x in k], q)
    cfg = KATConfig(window=w, persistence=1, min_length=0, min_fill=1, tau_quantile=q)
    tau = threshold_of([x / denom for x in k], cfg)
    assert same_tau(exact, tau, w)
    for s in {math.floor(exact * denom) - 1, math.floor(exact * denom), math.ceil(exact * denom)}:
        if s < 0:
            continue
        trace = np.array([s * 2.0**-24] + [0.0] * (w - 1))  # one window, integer sum s exactly
        fired = replay(trace, np.array([0, w]), cfg, tau).fire[0] >= 0
        assert fired == (Fraction(s, denom) < exact), (s, exact)


def _steps_as_ragged(steps: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    traces = [t for step in steps for t in step]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in traces])]).astype(np.int64)
    flat = np.array([v for t in traces for v in t], dtype=np.float64)
    step_of = np.array([i for i, step in enumerate(steps) for _ in step], dtype=np.int64)
    return flat, offsets, step_of


@pytest.mark.filterwarnings("ignore::kat_diag.kat.detector.KATResolutionWarning")  # exact zeros: tau 0
@settings(max_examples=150, deadline=None)
@given(cfg=configs(), steps=STEPS)
def test_trap_buffer_replay_equals_the_reference_on_full_traces(cfg, steps):
    """M2 (issue 23): `kat-diag trap` on a store of several steps replays the buffer exactly as KAT
    online would have fed it from these (uncut) traces: tau per step and fire per rollout equal
    the plain-Python reference, which pushes only the tokens up to each rollout's fire."""
    from kat_diag.analysis.trap import step_taus

    steps = steps if len(steps) > 1 else steps * 2  # several steps (one step: the store is its own buffer)
    flat, offsets, step_of = _steps_as_ragged(steps)
    ref = reference_run(steps, cfg)
    tau = step_taus(flat, offsets, step_of, cfg)
    fire = replay(flat, offsets, cfg, tau).fire
    for i, e in enumerate(ref):
        sel = step_of == i
        assert all(same_tau(e["tau"], float(t), cfg.window) for t in tau[sel]), (i, e["tau"], tau[sel])
        assert fire[sel].tolist() == e["fire"], i


def test_kl_below_the_detector_resolution_is_reported_not_silent(tmp_path):
    """M4 (issue 23): per-token KL below 2**-24 nats over whole windows quantises to 0, so tau is 0
    and no window is strictly below it, though in exact arithmetic tau would be 3.1e-9 and the
    step-1 rollout (1e-9 per token) would fire. KAT must say so: a KATResolutionWarning once, the
    metric tau_at_floor every such step, and the same report from `replay` and `trap`."""
    from kat_diag.analysis.replay import replay_store
    from kat_diag.analysis.trap import trap_stats
    from kat_diag.kat.detector import KATResolutionWarning
    from kat_diag.traces.reader import TraceReader
    from kat_diag.traces.writer import TraceWriter

    cfg = KATConfig(window=4, persistence=1, min_length=0, warmup_steps=1, buffer_size=8, min_fill=1)
    steps = [[[3.1e-9] * 8], [[1e-9] * 8], [[1e-9] * 8]]
    assert min(Fraction(v) for v in steps[1][0]) < Fraction(3.1e-9)  # exact arithmetic would fire
    policy = KATPolicy(cfg)
    with pytest.warns(KATResolutionWarning, match="KAT cannot fire at step 1"):
        got = [engine_run_policy(policy, step, traces) for step, traces in enumerate(steps)]
    assert [g["fire"] for g in got] == [[-1], [-1], [-1]]
    assert [g["metrics"]["tau_at_floor"] for g in got] == [0.0, 1.0, 1.0] and got[1]["metrics"]["tau"] == 0.0
    # At the resolution (>= 2**-24 per token) KAT works as usual: the same shape fires.
    scaled = [[[v * 2**26 for v in t] for t in traces] for traces in steps]
    assert reference_run(scaled, cfg)[1]["fire"] == [3]
    # Offline: replay and trap report the floor too.
    with TraceWriter(tmp_path / "run", top_n=1) as w:
        for i, (trace,) in enumerate(steps):
            w.append({"step": i, "prompt_id": "p", "policy": "none", "correct": False,
                      "token_ids": [np.zeros(8, np.int32)], "kl": [np.array(trace, np.float32)]})
    with pytest.warns(KATResolutionWarning, match="in 2 of 3 steps"):
        res = replay_store(TraceReader(tmp_path / "run"), cfg)
    assert res["tau"]["at_floor_steps"] == 2 and res["fired_share"] == 0.0
    flat, offsets, step_of = _steps_as_ragged(steps)
    with pytest.warns(KATResolutionWarning, match="on 2 of 3 rollouts"):
        trap_stats(flat, offsets, np.zeros(3, bool), cfg, steps=step_of)

    # A sampled estimate (k1 = log p_s - log p_T of the sampled token) can be negative: a tau <= 0 is
    # then no floor, windows go below it and KAT fires; neither trap nor replay may claim otherwise.
    k1 = [[[-0.01] * 8], [[-0.05] * 8], [[-0.05] * 8]]
    flat, offsets, step_of = _steps_as_ragged(k1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KATResolutionWarning)
        rep = trap_stats(flat, offsets, np.zeros(3, bool), cfg, steps=step_of)
        assert rep["tau"] < 0 and rep["fire_rate"] > 0
        with TraceWriter(tmp_path / "k1", top_n=1, kl_source="k1") as w:
            for i, (trace,) in enumerate(k1):
                w.append({"step": i, "prompt_id": "p", "policy": "none", "correct": False,
                          "token_ids": [np.zeros(8, np.int32)], "kl": [np.array(trace, np.float32)]})
        assert replay_store(TraceReader(tmp_path / "k1"), cfg)["fired_share"] > 0


def engine_run_policy(policy: KATPolicy, step: int, traces: list[list[float]]) -> dict:
    """One step of KATPolicy over whole traces in one chunk (all rows at once)."""
    policy.begin_step(step)
    policy.add_rows(len(traces))
    n = max(len(t) for t in traces)
    kl_BC = torch.zeros(len(traces), n, dtype=torch.float64)
    valid_BC = torch.zeros(len(traces), n, dtype=torch.bool)
    for r, t in enumerate(traces):
        kl_BC[r, : len(t)] = torch.tensor(t, dtype=torch.float64)
        valid_BC[r, : len(t)] = True
    policy.update(kl_BC, valid_BC)
    fire = [int(f) for f in policy.row_info()["fire"]]
    stored = [torch.tensor(t[: f + 1] if f >= 0 else t, dtype=torch.float64) for t, f in zip(traces, fire, strict=True)]
    return {"fire": fire, "metrics": policy.end_step(stored)}
