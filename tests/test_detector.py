"""KAT detector: exact against a slow reference, chunk-size invariant, adaptive tau, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import (
    KL_SCALE,
    AdaptiveThreshold,
    StreamingDetector,
    buffer_values_of,
    kept_tokens,
    onset_from_fire,
)

BACKENDS = ("numpy", "torch")
LOW, HIGH = 0.01, 1.0


def reference_fire(d: list[float], cfg: KATConfig, tau: float) -> int:
    """Obviously-correct fire position (loops everywhere), on the detector's fixed-point values."""
    if math.isnan(tau):
        return -1
    w, t, l0 = cfg.window, cfg.persistence, cfg.min_length
    q = [int(v * KL_SCALE) if math.isfinite(v) and abs(v) <= 1024 else None for v in d]
    run = 0
    for i in range(len(d)):
        low = False
        if i >= w - 1:
            win = q[i - w + 1: i + 1]
            low = all(x is not None for x in win) and sum(win) < tau * (w * KL_SCALE)
        run = run + 1 if low else 0
        if run >= t and i + 1 >= l0:
            return i
    return -1


def feed(det: StreamingDetector, kl_BL: torch.Tensor, lengths: list[int], chunk: int) -> None:
    """Feed rows of different lengths in chunks, with a prefix valid mask."""
    pos = torch.arange(kl_BL.shape[1])
    valid_BL = pos[None, :] < torch.tensor(lengths)[:, None]
    for s in range(0, kl_BL.shape[1], chunk):
        det.update(kl_BL[:, s:s + chunk], valid_BL[:, s:s + chunk])


# Traces made of runs, so that low stretches long enough to fire actually occur.
VALUES = st.sampled_from([LOW, 0.0, 0.002, HIGH, 0.3, 5.0, math.nan, math.inf, -math.inf, 2000.0])
RUN = st.tuples(VALUES, st.integers(1, 12))
TRACE = st.lists(RUN, max_size=8).map(lambda runs: [v for v, k in runs for _ in range(k)])
CONFIGS = st.builds(KATConfig, window=st.integers(1, 5), persistence=st.integers(1, 4),
                    min_length=st.integers(0, 20), keep=st.sampled_from(["onset", "fire"]))
TAUS = st.sampled_from([0.05, 0.1, 0.3, 2.0, math.nan]) | st.floats(0.0, 1.0)


def as_batch(traces: list[list[float]]) -> tuple[torch.Tensor, list[int]]:
    lengths = [len(t) for t in traces]
    width = max(lengths + [1])
    kl = torch.zeros(len(traces), width, dtype=torch.float64)
    for b, t in enumerate(traces):
        kl[b, : len(t)] = torch.tensor(t, dtype=torch.float64)
    return kl, lengths


@settings(max_examples=80, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=5), tau=TAUS,
       chunk=st.integers(1, 40), backend=st.sampled_from(BACKENDS))
def test_matches_reference_for_every_chunk_size(cfg, traces, tau, chunk, backend):
    kl, lengths = as_batch(traces)
    det = StreamingDetector(cfg, len(traces), backend=backend)
    det.set_tau(tau)
    feed(det, kl, lengths, chunk)
    expected = [reference_fire(t, cfg, tau) for t in traces]
    assert det.fire_B.tolist() == expected
    assert det.onset_B.tolist() == [f - cfg.persistence - cfg.window + 2 if f >= 0 else -1 for f in expected]
    assert det.tokens_B.tolist() == lengths


@settings(max_examples=60, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=5), tau=TAUS, chunk=st.integers(2, 40))
def test_chunked_equals_per_token(cfg, traces, tau, chunk):
    kl, lengths = as_batch(traces)
    one, many = StreamingDetector(cfg, len(traces)), StreamingDetector(cfg, len(traces))
    for det, c in ((one, 1), (many, chunk)):
        det.set_tau(tau)
        feed(det, kl, lengths, c)
    assert torch.equal(one.fire_B, many.fire_B)
    assert torch.equal(one.tokens_B, many.tokens_B)
    assert one.nonfinite_count == many.nonfinite_count


@settings(max_examples=40, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=4), tau=TAUS, chunk=st.integers(1, 30))
def test_numpy_and_torch_backends_agree(cfg, traces, tau, chunk):
    kl, lengths = as_batch(traces)
    dets = [StreamingDetector(cfg, len(traces), backend=b) for b in BACKENDS]
    for det in dets:
        det.set_tau(tau)
        feed(det, kl.float(), lengths, chunk)
    assert torch.equal(dets[0].fire_B, dets[1].fire_B)
    assert dets[0].nonfinite_count == dets[1].nonfinite_count


@settings(max_examples=60, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=4), chunk=st.integers(1, 30))
def test_never_fires_before_l0_or_while_inactive(cfg, traces, chunk):
    kl, lengths = as_batch(traces)
    active = StreamingDetector(cfg, len(traces))
    active.set_tau(1e9)  # every usable window is low: fires as early as the rules allow
    feed(active, kl, lengths, chunk)
    fire = active.fire_B
    fired = fire >= 0
    assert bool((fire[fired] + 1 >= cfg.min_length).all())
    assert bool((fire[fired] >= cfg.window + cfg.persistence - 2).all())
    # Inactive (warm-up or empty buffer: tau NaN) never fires, whatever the trace.
    inactive = StreamingDetector(cfg, len(traces))
    inactive.set_tau(math.nan)
    feed(inactive, kl, lengths, chunk)
    assert not bool(inactive.fired_B.any())


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 8), t=st.integers(1, 6), start=st.integers(0, 40), extra=st.integers(0, 10),
       l0=st.integers(0, 30), tail=st.integers(0, 10))
def test_planted_low_run_fires_at_expected_position(w, t, start, extra, l0, tail):
    cfg = KATConfig(window=w, persistence=t, min_length=l0)
    run = w + t - 1 + extra  # low tokens: enough for T low windows, plus some
    trace = [HIGH] * start + [LOW] * run + [HIGH] * tail
    det = StreamingDetector(cfg, 1)
    det.set_tau(0.1)
    det.update(torch.tensor([trace]))
    # First low window ends at start + W - 1; T of them end at start + W + T - 2; L0 can delay it
    # as long as the run lasts.
    first = start + w + t - 2
    last_low_window = start + run - 1
    expected = max(first, l0 - 1)
    if expected > last_low_window:
        expected = -1
    assert det.fire_B.item() == expected
    if expected >= 0:
        assert det.onset_B.item() == expected - t - w + 2
        assert det.onset_B.item() == start or l0 - 1 > first  # onset = run start unless L0 delayed


def test_fire_and_onset_on_a_concrete_trace():
    cfg = KATConfig(window=4, persistence=3, min_length=0)
    trace = [1.0] * 10 + [0.0] * 20
    det = StreamingDetector(cfg, 1)
    det.set_tau(0.5)
    det.update(torch.tensor([trace]))
    # Window means drop below 0.5 at i = 11 (two of four tokens high -> 0.5 is not < 0.5):
    # 1,1,0,0 -> 0.5 at i=11; 1,0,0,0 -> 0.25 at i=12. Low from 12, T=3 low windows at 14.
    assert det.fire_B.item() == 14
    # onset = first token of the first low window (i = 12 covers tokens 9..12).
    assert det.onset_B.item() == 14 - 3 - 4 + 2 == 9
    assert det.keep_B.item() == 9
    fire_cfg = KATConfig(window=4, persistence=3, min_length=0, keep="fire")
    assert kept_tokens(det.fire_B, det.tokens_B, fire_cfg).item() == 15


def test_nonfinite_breaks_the_run_and_is_counted():
    cfg = KATConfig(window=2, persistence=3, min_length=0)
    base = [1.0] * 4 + [0.0] * 12
    for bad in (math.nan, math.inf, -math.inf, 5000.0, -5000.0):
        trace = list(base)
        trace[6] = bad
        det = StreamingDetector(cfg, 2)
        det.set_tau(0.1)
        det.update(torch.tensor([base, trace]))
        # Clean: windows low from i=5 (both tokens 0), fire at 7. Poisoned token 6: windows 6 and
        # 7 are not low (a -inf does not make them "very low"), the run restarts at 8, fires at 10.
        assert det.fire_B.tolist() == [7, 10]
        assert det.nonfinite_count == 1


def test_short_rollouts_never_fire_and_zero_width_chunks_are_noops():
    cfg = KATConfig(window=8, persistence=1, min_length=0)
    det = StreamingDetector(cfg, 3)
    det.set_tau(1e9)
    det.update(torch.zeros(3, 0))
    det.update(torch.zeros(3, 7))  # 7 < W tokens: no window exists yet
    assert det.fire_B.tolist() == [-1, -1, -1]
    det.update(torch.zeros(3, 1))
    assert det.fire_B.tolist() == [7, 7, 7]
    for backend in BACKENDS:  # an empty batch is fine too
        empty = StreamingDetector(cfg, 0, backend=backend)
        assert empty.update(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool)).shape == (0,)


def test_dtypes_give_identical_decisions():
    rng = np.random.default_rng(0)
    kl = torch.tensor(rng.exponential(0.05, size=(16, 200)), dtype=torch.bfloat16)
    fires = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        det = StreamingDetector(KATConfig(window=4, persistence=3, min_length=0), 16)
        det.set_tau(0.04)
        det.update(kl.to(dtype))
        fires.append(det.fire_B)
    assert all(torch.equal(fires[0], f) for f in fires[1:])
    assert bool((fires[0] >= 0).any())


def test_window_means_are_the_stride_windows():
    cfg = KATConfig(window=4, persistence=1, min_fill=1, statistic="windows")
    rng = np.random.default_rng(1)
    kl = rng.uniform(0, 1, size=(3, 23))
    lengths = [23, 9, 3]
    got = buffer_values_of([kl[b, : lengths[b]] for b in range(3)], cfg)
    q = np.trunc(kl * KL_SCALE)
    expected = [q[b, k: k + 4].sum() / (4 * KL_SCALE) for b in range(3) for k in range(0, lengths[b] - 3, 4)]
    np.testing.assert_array_equal(got, expected)  # rollout order, then position


def test_rollout_minima_are_exact_window_minima():
    rng = np.random.default_rng(2)
    kl = [rng.uniform(0, 1, size=n) for n in (40, 3, 17)]
    got = buffer_values_of(kl, KATConfig(window=3, min_fill=1))
    q = [np.trunc(k * KL_SCALE) for k in kl]
    expected = [min(x[i: i + 3].sum() for i in range(len(x) - 2)) / (3 * KL_SCALE) for x in q if len(x) >= 3]
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=50, deadline=None)
@given(cfg=CONFIGS, traces=st.lists(TRACE, min_size=1, max_size=8), tau=TAUS,
       chunk=st.integers(1, 12), slots=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_compaction_gives_the_same_per_rollout_decisions(cfg, traces, tau, chunk, slots, seed):
    """Engine-style batch: at most `slots` live rows; finished rows are dropped (keep_rows in a
    shuffled order) and freed slots refilled (add_rows); decisions match an uncompacted batch."""
    rng = np.random.default_rng(seed)
    kl, lengths = as_batch(traces)
    full = StreamingDetector(cfg, len(traces))
    full.set_tau(tau)
    feed(full, kl, lengths, chunk)

    det = StreamingDetector(cfg)
    det.set_tau(tau)
    live: list[int] = []  # rollout id of each row
    pos: list[int] = []
    fire = {}
    waiting = list(range(len(traces)))
    while waiting or live:
        n_new = min(slots - len(live), len(waiting))
        det.add_rows(n_new)
        live += waiting[:n_new]
        pos += [0] * n_new
        waiting = waiting[n_new:]
        kl_BC = torch.zeros(len(live), chunk, dtype=torch.float64)
        valid_BC = torch.zeros(len(live), chunk, dtype=torch.bool)
        for r, (rid, p) in enumerate(zip(live, pos, strict=True)):
            k = min(chunk, lengths[rid] - p)
            kl_BC[r, :k] = kl[rid, p: p + k]
            valid_BC[r, :k] = True
        det.update(kl_BC, valid_BC)
        pos = [p + chunk for p in pos]
        done = [r for r, (rid, p) in enumerate(zip(live, pos, strict=True)) if p >= lengths[rid]]
        for r in done:
            fire[live[r]] = det.fire_B[r].item()
        keep = [r for r in range(len(live)) if r not in done]
        rng.shuffle(keep)
        det.keep_rows(torch.tensor(keep, dtype=torch.int64))
        live = [live[r] for r in keep]
        pos = [pos[r] for r in keep]
    assert [fire[r] for r in range(len(traces))] == full.fire_B.tolist()


def test_onset_and_keep_helpers():
    cfg = KATConfig(window=16, persistence=8)
    assert cfg.fire_lag == 22
    assert onset_from_fire(40, cfg) == 18 and onset_from_fire(-1, cfg) == -1
    np.testing.assert_array_equal(onset_from_fire(np.array([-1, 22]), cfg), [-1, 0])
    np.testing.assert_array_equal(kept_tokens(np.array([-1, 30]), np.array([50, 60]), cfg), [50, 8])


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(("kwargs", "name"), [
    ({"window": 0}, "window"), ({"window": 5000}, "window"), ({"persistence": 0}, "persistence"),
    ({"min_length": -1}, "min_length"), ({"warmup_steps": -1}, "warmup_steps"),
    ({"buffer_size": 0}, "buffer_size"), ({"tau_quantile": 0.0}, "tau_quantile"),
    ({"tau_quantile": 1.0}, "tau_quantile"), ({"tau_quantile": math.nan}, "tau_quantile"),
    ({"keep": "all"}, "keep"), ({"window": 2.5}, "window"), ({"min_fill": 0}, "min_fill"),
    ({"buffer_size": 8, "min_fill": 9}, "B_min <= B"), ({"statistic": "mean"}, "statistic"),
])
def test_config_rejects_bad_values_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KATConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        KATConfig().window = 3  # type: ignore[misc]


# ---------------------------------------------------------------- threshold
def test_threshold_empty_buffer_is_inactive_and_warmup_blocks_firing():
    thr = AdaptiveThreshold(KATConfig(warmup_steps=2, buffer_size=4, min_fill=1, tau_quantile=0.5))
    assert math.isnan(thr.begin_step(0)) and not thr.active and math.isnan(thr.effective_tau)
    assert thr.observe([1.0, 2.0, math.nan, 3.0]) == 3
    thr.begin_step(1)
    assert thr.tau == 2.0 and not thr.active  # warm-up: tau known, detector off
    thr.begin_step(2)
    assert thr.active and thr.effective_tau == 2.0
    thr.observe(torch.tensor([10.0, 11.0, 12.0]))  # FIFO keeps the last 4
    assert thr.buffer.tolist() == [3.0, 10.0, 11.0, 12.0]
    assert thr.tau == 2.0  # fixed within the step
    assert thr.begin_step(3) == pytest.approx(10.5)


def test_threshold_state_dict_resumes_exactly():
    cfg = KATConfig(buffer_size=8, min_fill=1, tau_quantile=0.3)
    a = AdaptiveThreshold(cfg)
    a.observe(np.arange(20.0))
    a.begin_step(7)
    b = AdaptiveThreshold(cfg)
    b.load_state_dict(torch.load(_roundtrip(a.state_dict()), weights_only=True))
    assert b.tau == a.tau and b.step == a.step and torch.equal(a.buffer, b.buffer)
    for t in (a, b):
        t.observe([100.0, 200.0])
        t.begin_step(8)
    assert a.tau == b.tau


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 0.01]), eta=st.sampled_from([0.1, 0.2, 0.5]))
def test_tau_follows_a_shift_of_the_kl_scale(seed, scale, eta):
    """Steps with KL scale 1.0, then the same traces times `scale`: once the buffer has turned over,
    tau is the old tau times `scale` (up to the 2**-24 quantisation)."""
    cfg = KATConfig(window=4, persistence=2, min_length=0, warmup_steps=0, buffer_size=64, min_fill=1,
                    tau_quantile=eta, statistic="windows")
    thr = AdaptiveThreshold(cfg)
    rng = np.random.default_rng(seed)
    traces = torch.tensor(rng.exponential(1.0, size=(8, 32)))
    taus = []
    for step in range(6):
        thr.begin_step(step)
        taus.append(thr.tau)
        det = StreamingDetector(cfg, 8)
        det.set_tau(thr.effective_tau)
        kl = traces * (1.0 if step < 3 else scale)
        det.update(kl)
        thr.observe(buffer_values_of(list(kl), cfg))  # 64 means per step: the buffer turns over each step
    assert math.isnan(taus[0])
    assert taus[1] == taus[2] == taus[3]
    assert taus[4] == taus[5] == pytest.approx(scale * taus[1], rel=1e-4)
    assert taus[4] < taus[1]
