"""The KAT detector: persistent low-KL agreement, detected online, vectorised over a batch.

KAT (KL Agreement Trap Termination, docs/kat.md) stops a rollout once the windowed reverse KL
has stayed below an adaptive threshold for long enough. This module holds the pieces that
decision needs and nothing model-specific, so the rollout engine (through
`kat_diag.kat.policies`), offline replay (`kat_diag.analysis.replay`) and phase segmentation
(`kat_diag.kat.phases`) all run the very same code:

- `KATConfig`: the parameters (W, T, L0, K, B, B_min, tau quantile, statistic, keep), validated
  when built; `KAT_PRESETS` / `kat_preset` hold the paper's values and the embedded world's.
- `buffer_values` / `rollout_minima` / `threshold_of`: what finished rollouts contribute to the
  threshold buffer and the quantile taken of it, as pure functions over ragged KL, so online
  training and offline replay compute them from the very same stored tokens.
- `AdaptiveThreshold`: the FIFO buffer and the threshold in force for a step.
- `StreamingDetector`: per-rollout state for a batch; `update` consumes a chunk of C new tokens
  per row and takes exactly the decisions that feeding the tokens one by one would take.

The threshold (docs/kat.md). With the paper's statistic (`rollout_min`, the default) each finished
rollout pushes its minimum window mean min_i m_i into a FIFO buffer of capacity B; with our
earlier variant (`windows`) it pushes the means of its non-overlapping windows (i = W-1, 2W-1,
...). Only the tokens the rollout kept in its trace count (a rollout cut at fire contributes the
windows up to fire), rollouts are pushed in a defined order (rank, then position in the step's
prompt list), and a step's values count from the next step on. tau = the `tau_quantile` quantile
of the buffer (the paper's eta = 0.3 is tau_quantile = 0.7), recomputed once per step. KAT is
active only from step K on AND once the buffer holds at least B_min values; while inactive the
threshold in force is NaN and nothing fires.

Position convention (0-based, used everywhere in the project). Generated tokens are i = 0..n-1
with reverse KL d_i. The window mean m_i = mean(d_{i-W+1..i}) exists for i >= W-1. Window i is
*low* when its W values are all usable (below) and m_i < tau. The detector fires at the first i
with

    windows i-T+1 .. i all low,   i + 1 >= L0,   detector active (tau defined, warm-up over).

onset = fire - T - W + 2 (first token of the first of those T windows). When L0 delays the fire
the low run is longer than T at fire time; onset is still fire - T - W + 2: it marks where the
detector's last T windows of evidence start, fire - onset is always T + W - 2, and the kept
prefix is never shorter than L0 - T - W + 1. Online, replay and phases all use this definition.
Not fired: onset = fire = -1. Rollouts shorter than W (no window) never fire.

Exactness. Floating running sums depend on the order of additions, so chunked and per-token
evaluation would disagree near tau. KL values are therefore quantised to fixed point,
q_i = trunc(d_i * 2**24) (resolution 6e-8 nats), and window sums are exact int64 integers.
Window i is low iff sum(q_{i-W+1..i}) < tau * W * 2**24, compared exactly through the ceil() of
the exact (rational) product. A token whose KL is NaN, +-inf or beyond +-1024 nats (no real model gives
that per token) is *unusable*: it is stored as a "poison" value 2**P (P chosen from W) that
makes every window containing it not low and keeps it out of the threshold buffer; such tokens
are counted (`nonfinite_count`). P keeps every cumulative sum below 2**62.

Speed. `update` is ~25 array ops with no loop and no host sync. On CPU it runs on numpy views of
the tensors (numpy's per-call overhead is several times lower than torch's on small arrays);
on any other device it runs the same ops in torch. Both backends are exact and agree bit for
bit (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from kat_diag.kat.config import KATConfig

# Fixed-point quantisation of per-token KL: resolution 2**-24 nats, usable range +-1024 nats.
KL_SCALE_BITS = 24

KL_SCALE = float(2**KL_SCALE_BITS)

KL_LIMIT = 1024.0

_QMAX_BITS = KL_SCALE_BITS + 10  # log2(KL_LIMIT * KL_SCALE)

_QMAX_F = KL_LIMIT * KL_SCALE

_NOT_FIRED = 2**62  # internal sentinel: min() keeps the first fire without a branch


class KATResolutionWarning(UserWarning):
    """KAT's threshold is at the fixed-point floor: no window of non-negative KL can be below it."""


def at_resolution_floor(tau: float) -> bool:
    """True when the threshold in force is finite and <= 0. The detector reads KL in steps of
    2**-24 nats (6e-8, truncated), so when the buffer's minimum window means are 0 at that
    resolution (per-token KL below ~6e-8 nats over whole windows: below float32 rounding of the
    models' log-probs) the threshold is 0 and, KL being >= 0, no window is strictly below it: KAT
    is active but cannot fire. Callers report it (`floor_message`) instead of staying silent."""
    return tau <= 0.0  # False for NaN (inactive)


def floor_message(tau: float, where: str) -> str:
    """The one-line report of `at_resolution_floor` (where: e.g. 'from step 7 on')."""
    return (f"KAT cannot fire {where}: its threshold tau = {tau:.3g} is at the detector's resolution "
            f"floor (KL is read in steps of 2^-24 = {1 / KL_SCALE:.1e} nats and the buffer's minimum window "
            "means are 0 at that resolution, so no window of non-negative KL is strictly below it)")


def onset_from_fire(fire: Any, cfg: KATConfig) -> Any:
    """onset for fire positions (int, tensor or array); -1 (not fired) stays -1."""
    lag = cfg.fire_lag
    if isinstance(fire, (int, np.integer)):
        return int(fire) - lag if fire >= 0 else -1
    if isinstance(fire, torch.Tensor):
        return torch.where(fire >= 0, fire - lag, -1)
    fire = np.asarray(fire)
    return np.where(fire >= 0, fire - lag, -1)


def kept_tokens(fire: Any, length: Any, cfg: KATConfig) -> Any:
    """Tokens kept for training: onset or fire+1 (cfg.keep) when fired, else `length`."""
    if isinstance(fire, torch.Tensor):
        kept = onset_from_fire(fire, cfg) if cfg.keep == "onset" else fire + 1
        return torch.where(fire >= 0, kept, length)
    fire = np.asarray(fire)
    kept = onset_from_fire(fire, cfg) if cfg.keep == "onset" else fire + 1
    return np.where(fire >= 0, kept, length)


def _threshold_units(tau: float, window: int, half: int) -> int:
    """Integer t with: (integer window sum s) < tau*W*2**24  <=>  s < t, for every usable window.

    The product is taken exactly (as a fraction), so "window mean < tau" is decided exactly for
    any float tau. Clamped to [-half, half] (usable sums lie well inside, poisoned ones above);
    NaN gives -half - 1 so that nothing is low.
    """
    if math.isnan(tau):
        return -half - 1
    if math.isinf(tau):
        return half if tau > 0 else -half
    t = math.ceil(Fraction(tau) * (window * 2**KL_SCALE_BITS))
    return max(-half, min(half, t))


def _threshold_units_array(tau_B: np.ndarray, window: int, half: int) -> np.ndarray:
    """Vector version of `_threshold_units` (exact per distinct tau; replay has few of them)."""
    tau = np.asarray(tau_B, dtype=np.float64).reshape(-1)
    uniq, inv = np.unique(tau, return_inverse=True)  # NaNs collapse into one entry in numpy >= 1.21
    units = np.array([_threshold_units(float(u), window, half) for u in uniq], dtype=np.int64)
    return units[inv.reshape(-1)].reshape(np.shape(tau_B))


# ------------------------------------------------------------------------------ buffer values


def _fixed_point_cumsums(kl_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums of the detector's fixed-point values (int64) and of the unusable-token count.

    q = trunc(d * 2**24) as in `StreamingDetector.update`; scaling by a power of two is exact in the
    input's own float type, so float32 and float64 copies of a value give the same q.
    """
    v = np.asarray(kl_values).reshape(-1)
    if v.dtype.kind != "f" or v.itemsize < 4:
        v = v.astype(np.float64)
    y = v * v.dtype.type(KL_SCALE)
    ok = np.abs(y) <= _QMAX_F  # False for NaN and inf too
    cs = np.zeros(v.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.where(ok, y, 0).astype(np.int64), out=cs[1:])
    bad = np.zeros(v.shape[0] + 1, dtype=np.int64)
    np.cumsum(~ok, out=bad[1:])
    return cs, bad


def rollout_minima(kl_values: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Per rollout, min over its usable windows of the window mean (float64; NaN if it has none:
    shorter than W, or every window holds an unusable KL). Exact: the same fixed point as the
    detector, so a window is below a threshold here iff the detector calls it low."""
    offs = np.asarray(offsets, dtype=np.int64)
    n_roll = max(0, offs.shape[0] - 1)
    w = int(window)
    out = np.full(n_roll, np.nan)
    cs, bad = _fixed_point_cumsums(kl_values)
    n = cs.shape[0] - 1
    if n < w or n_roll == 0:
        return out
    never = np.iinfo(np.int64).max
    # Sum of the window ending at flat position g + W - 1, for every g; windows crossing a
    # rollout border are never selected below.
    sums = np.where(bad[w:] == bad[:-w], cs[w:] - cs[:-w], never)
    starts, ends = offs[:-1], offs[1:] - w + 1  # rollout r's windows: sums[starts[r]:ends[r]]
    has = ends > starts
    if not has.any():
        return out
    idx = np.stack([starts[has], ends[has]], 1).reshape(-1)
    mins = np.minimum.reduceat(np.append(sums, never), idx)[::2]  # segments are disjoint and ordered
    out[has] = np.where(mins < never, mins.astype(np.float64) / float(w * KL_SCALE), np.nan)
    return out


def buffer_values(kl_values: np.ndarray, offsets: np.ndarray, cfg: KATConfig) -> np.ndarray:
    """What these rollouts push into the threshold buffer, in order (rollout order, then position).

    `rollout_min`: one value per rollout that has a usable window (its minimum window mean).
    `windows`: the means of its usable non-overlapping windows i = W-1, 2W-1, ...
    Pass exactly the tokens each rollout kept in its trace (a rollout cut at fire: up to fire).
    """
    if cfg.statistic == "rollout_min":
        m = rollout_minima(kl_values, offsets, cfg.window)
        return m[np.isfinite(m)]
    w = cfg.window
    offs = np.asarray(offsets, dtype=np.int64)
    cs, bad = _fixed_point_cumsums(kl_values)
    n_win = np.diff(offs) // w
    rollout = np.repeat(np.arange(n_win.shape[0], dtype=np.int64), n_win)
    k = np.arange(rollout.shape[0], dtype=np.int64) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    end = offs[:-1][rollout] + (k + 1) * w  # exclusive end of each stride window
    ok = bad[end] == bad[end - w]
    return (cs[end] - cs[end - w])[ok].astype(np.float64) / float(w * KL_SCALE)


def buffer_values_of(kl_by_rollout: Sequence[Any], cfg: KATConfig) -> np.ndarray:
    """`buffer_values` for a list of per-rollout KL arrays or CPU tensors (one step's rollouts)."""
    if not len(kl_by_rollout):
        return np.zeros(0, dtype=np.float64)
    lengths = [int(x.shape[0]) if hasattr(x, "shape") else len(x) for x in kl_by_rollout]
    if all(isinstance(x, torch.Tensor) for x in kl_by_rollout):
        values = torch.cat([x.detach().reshape(-1).cpu() for x in kl_by_rollout]).numpy()  # one copy
    else:
        values = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in kl_by_rollout])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return buffer_values(values, offsets, cfg)


def threshold_of(values: np.ndarray | Sequence[float], cfg: KATConfig) -> float:
    """tau = the cfg.tau_quantile quantile of the finite values (linear interpolation, numpy's
    default definition); NaN when fewer than cfg.min_fill finite values are given.

    Exact. Buffer values are window means, k / (W 2**24) for an integer window sum k, stored as
    the nearest float64, which can lie above k / (W 2**24) when W is not a power of two. Each value
    is therefore read back as that exact fraction, the quantile is taken in exact arithmetic (the
    interpolation index (n - 1) q with q the float given), and the float returned is the one
    nearest the exact quantile among those the detector reads as the same threshold, so "window
    mean < tau" holds exactly when it holds for the exact quantile: a window whose mean equals it
    is not low (DESIGN §2: strictly below).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.shape[0] < cfg.min_fill or v.shape[0] == 0:
        return math.nan
    return exact_quantile(v, cfg.tau_quantile, cfg.window)


def exact_quantile(values: np.ndarray, q: float, window: int) -> float:
    """The q quantile of window means (finite float64 values, see `threshold_of`), as the float that
    the detector reads exactly as the exact quantile."""
    denom = int(window) << KL_SCALE_BITS
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n = v.shape[0]
    h = (n - 1) * Fraction(float(q))
    lo = math.floor(h)
    hi = min(lo + 1, n - 1)
    k_lo = round(Fraction(float(v[lo])) * denom)  # the integer window sums the floats stand for
    k_hi = round(Fraction(float(v[hi])) * denom)
    units = k_lo + (h - lo) * (k_hi - k_lo)  # exact quantile x W 2**24
    return _deciding_float(units, denom)


def _deciding_float(units: Fraction, denom: int) -> float:
    """The float nearest units / denom with ceil(float * denom) == ceil(units): the detector
    (`_threshold_units`) then calls an integer window sum s low iff s < units."""
    t = math.ceil(units)
    f = float(units / denom)

    def ceil_of(x: float) -> int:
        return math.ceil(Fraction(x) * denom)

    if math.ulp(f) * denom >= 0.5:  # far outside the detector's range: no float to choose between
        return f
    while ceil_of(f) > t:  # rounded up past t / denom: step down (at most a few ulps)
        f = math.nextafter(f, -math.inf)
    while ceil_of(f) < t:  # rounded down to (t - 1) / denom or below: step up
        f = math.nextafter(f, math.inf)
    return f


class AdaptiveThreshold:
    """FIFO buffer of what finished rollouts contribute; the threshold in force, fixed per step.

    `observe` appends values (in the defined order of `buffer_values`) and keeps the last
    `buffer_size`; `begin_step` recomputes the buffer's quantile once, so every rollout of a step
    sees the same threshold and values observed during a step count from the next step on.
    Inactive (threshold in force NaN, nothing fires) before step K and while the buffer holds
    fewer than B_min values.
    """

    def __init__(self, cfg: KATConfig) -> None:
        self.cfg = cfg
        self._buffer = torch.empty(0, dtype=torch.float64)
        self._tau = math.nan
        self._step = -1

    @property
    def buffer(self) -> torch.Tensor:
        """The values currently held, oldest first (float64, CPU)."""
        return self._buffer

    @property
    def tau(self) -> float:
        """The buffer's quantile at the current step (NaN while the buffer is below B_min),
        whether or not KAT is active; `effective_tau` is the threshold in force."""
        return self._tau

    @property
    def step(self) -> int:
        """The step given to the last `begin_step` (-1 before any)."""
        return self._step

    @property
    def active(self) -> bool:
        """True when the detector may fire in the current step (step >= K and buffer >= B_min)."""
        return self._step >= self.cfg.warmup_steps and not math.isnan(self._tau)

    @property
    def effective_tau(self) -> float:
        """The threshold in force: tau when active, else NaN (hand it to `StreamingDetector.set_tau`
        and record it in metrics and traces)."""
        return self._tau if self.active else math.nan

    def observe(self, values: torch.Tensor | np.ndarray | Sequence[float]) -> int:
        """Append values, oldest first (non-finite ones are ignored); returns the count added."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]  # numpy: torch's boolean indexing costs ~10 ms on 4k values here
        cap = self.cfg.buffer_size
        if v.shape[0] > 0:
            buf = np.concatenate([self._buffer.numpy(), v])[-cap:]
            self._buffer = torch.from_numpy(buf.copy())
        return int(v.shape[0])

    def begin_step(self, step: int) -> float:
        """Start training step `step`: recompute the buffer's quantile; return the threshold in force."""
        self._step = int(step)
        self._tau = threshold_of(self._buffer.numpy(), self.cfg)
        return self.effective_tau

    def state_dict(self) -> dict[str, Any]:
        """Plain values and one CPU tensor: safe to put in a torch checkpoint."""
        return {"buffer": self._buffer.clone(), "tau": self._tau, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = torch.as_tensor(state["buffer"], dtype=torch.float64).reshape(-1).cpu()
        self._buffer = buf[-self.cfg.buffer_size:].clone()
        self._tau = float(state["tau"])
        self._step = int(state["step"])


class _NumpyOps:
    """Array ops for CPU state (numpy views; torch tensors in and out are zero-copy)."""

    name = "numpy"
    where = staticmethod(np.where)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def arr(self, x: Any, dtype: Any = None) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            try:
                x = x.numpy()  # zero-copy fast path: CPU, no grad, numpy dtype
            except (RuntimeError, TypeError):
                x = x.detach().cpu()
                # bf16 -> fp32 is exact (numpy has no bf16)
                x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        a = np.asarray(x, dtype=dtype)
        if dtype is None and a.dtype.kind == "f" and a.itemsize < 4:
            a = a.astype(np.float32)  # quantising in fp16 would overflow; fp32 is exact
        return a

    def torch(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x))

    def full(self, shape: tuple[int, ...], value: int) -> np.ndarray:
        return np.full(shape, value, dtype=np.int64)

    def arange(self, *args: int) -> np.ndarray:
        return np.arange(*args, dtype=np.int64)

    def cat(self, xs: list[np.ndarray], dim: int) -> np.ndarray:
        return np.concatenate(xs, dim)

    def to_int(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.int64)

    def cummax(self, x: np.ndarray) -> np.ndarray:
        return np.maximum.accumulate(x, axis=1)

    def first_true(self, x: np.ndarray) -> np.ndarray:
        return x.argmax(1)

    def gather(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, idx, 1)

    def count(self, x: np.ndarray) -> int:
        return int(np.count_nonzero(x))


class _TorchOps:
    """The same ops in torch, for state on an accelerator."""

    name = "torch"
    where = staticmethod(torch.where)
    maximum = staticmethod(torch.maximum)
    minimum = staticmethod(torch.minimum)

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def arr(self, x: Any, dtype: Any = None) -> torch.Tensor:
        t = torch.as_tensor(x, device=self.device)
        if dtype is not None:
            t = t.to(torch.bool if dtype is bool else getattr(torch, np.dtype(dtype).name))
        elif t.dtype not in (torch.float32, torch.float64) and t.is_floating_point():
            t = t.float()  # exact for bf16/fp16
        return t

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def full(self, shape: tuple[int, ...], value: int) -> torch.Tensor:
        return torch.full(shape, value, dtype=torch.int64, device=self.device)

    def arange(self, *args: int) -> torch.Tensor:
        return torch.arange(*args, dtype=torch.int64, device=self.device)

    def cat(self, xs: list[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(xs, dim)

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()

    def cummax(self, x: torch.Tensor) -> torch.Tensor:
        return x.cummax(1).values

    def first_true(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(torch.uint8).argmax(1)

    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.gather(1, idx)

    def count(self, x: torch.Tensor) -> torch.Tensor:
        return torch.count_nonzero(x)  # stays on the device: no sync


class StreamingDetector:
    """KAT decisions for a batch of rollouts, fed chunk by chunk (any chunk size, same result).

    State per row: the last W quantised values (window sums across chunk borders), the position of
    the last window that broke the low run (relative to the next token, folded with L0, see
    `update`), the token count and the fire position. `update` has no Python loop over rows or
    tokens and no host sync.

    tau is set with `set_tau` (one float for all rows, NaN = inactive: warm-up or empty buffer),
    or per row for one call with `update(..., tau_B=...)` (offline replay).
    Rows can be compacted (`keep_rows`) and appended (`add_rows`) between updates, matching a
    rollout engine that drops finished sequences and refills freed slots.
    The threshold buffer is fed from the finished rollouts' stored KL (`buffer_values`), not from
    here: tokens a chunk generated past a fire are dropped from the rollout, so they must not count.
    Inputs may be torch tensors or numpy arrays; results are torch tensors on `device`.
    `backend` = "auto" (numpy on CPU, torch elsewhere), "numpy" (CPU only) or "torch".
    """

    def __init__(self, cfg: KATConfig, batch_size: int = 0, *, device: str | torch.device = "cpu",
                 backend: str = "auto") -> None:
        self.cfg = cfg
        if backend not in ("auto", "numpy", "torch"):
            raise ValueError(f"backend={backend!r}: must be 'auto', 'numpy' or 'torch'")
        self._backend = backend
        w = cfg.window
        # Poison value for unusable KL: 2**P >= 4 * W * QMAX, so one poisoned token puts a window
        # sum above every usable sum (|sum| <= W*QMAX) and above every threshold (clamped to
        # 2**(P-1)); poisoned windows are recognisable as sums >= 2**(P-1).
        self._p_bits = _QMAX_BITS + 2 + max(0, math.ceil(math.log2(w)))
        self._poison = float(2**self._p_bits)
        self._half = 2 ** (self._p_bits - 1)
        # Cumulative sums over W + C values of at most 2**P each stay below 2**62.
        self.max_chunk = 2 ** (62 - self._p_bits) - w
        # Initial last break: windows before i = W-1 do not exist, and max(lb, L0-1-T) folds the
        # L0 rule into the run test (see `update`).
        self._lb_init = max(w - 2, cfg.min_length - 1 - cfg.persistence)
        self._tau = math.nan
        self._thr = _threshold_units(math.nan, w, self._half)
        self._finite_seen: Any = 0
        self._tokens_seen: Any = 0
        self._last_low: Any = None
        self._set_device(torch.device(device))
        self._reset_rows()
        if batch_size:
            self.add_rows(batch_size)

    def _set_device(self, device: torch.device) -> None:
        use_numpy = self._backend == "numpy" or (self._backend == "auto" and device.type == "cpu")
        if use_numpy and device.type != "cpu":
            raise ValueError(f"backend='numpy' needs a CPU device, got {device}")
        self.device = device
        self._ops: Any = _NumpyOps(device) if use_numpy else _TorchOps(device)
        self._consts_cache: dict[int, tuple[Any, ...]] = {}

    def _reset_rows(self) -> None:
        ops, w = self._ops, self.cfg.window
        self._hist_BW = ops.full((0, w), 0)
        self._lbrel_B1 = ops.full((0, 1), 0)
        self._n_B = ops.full((0,), 0)
        self._fire_B = ops.full((0,), 0)

    @property
    def backend(self) -> str:
        return self._ops.name

    # ------------------------------------------------------------------ rows
    @property
    def num_rows(self) -> int:
        return int(self._n_B.shape[0])

    def add_rows(self, n: int) -> None:
        """Append n fresh rows (new rollouts, nothing seen yet)."""
        if n < 0:
            raise ValueError(f"add_rows: n={n} must be >= 0")
        if n == 0:
            return
        ops = self._ops
        self._hist_BW = ops.cat([self._hist_BW, ops.full((n, self.cfg.window), 0)], 0)
        self._lbrel_B1 = ops.cat([self._lbrel_B1, ops.full((n, 1), self._lb_init)], 0)
        self._n_B = ops.cat([self._n_B, ops.full((n,), 0)], 0)
        self._fire_B = ops.cat([self._fire_B, ops.full((n,), _NOT_FIRED)], 0)

    def keep_rows(self, idx_B: torch.Tensor | np.ndarray | list[int]) -> None:
        """Keep only rows idx_B (integer indices), in that order (engine compaction)."""
        idx = self._ops.arr(idx_B, np.int64).reshape(-1)
        self._hist_BW = self._hist_BW[idx]
        self._lbrel_B1 = self._lbrel_B1[idx]
        self._n_B = self._n_B[idx]
        self._fire_B = self._fire_B[idx]

    def clear_rows(self) -> None:
        """Drop every row (end of a step); the non-finite counters are kept."""
        self._reset_rows()

    def to(self, device: str | torch.device) -> StreamingDetector:
        """Move all state to `device` (done automatically when `update` gets a tensor elsewhere)."""
        old = self._ops
        self._set_device(torch.device(device))
        new = self._ops

        def move(x: Any) -> Any:
            if x is None or isinstance(x, int):
                return x
            return new.arr(old.torch(x))

        for name in ("_hist_BW", "_lbrel_B1", "_n_B", "_fire_B", "_finite_seen", "_tokens_seen"):
            setattr(self, name, move(getattr(self, name)))
        self._last_low = None
        return self

    # ------------------------------------------------------------------ tau
    @property
    def tau(self) -> float:
        return self._tau

    def set_tau(self, tau: float | None) -> None:
        """Threshold for all rows from now on; None or NaN = inactive (never fires)."""
        self._tau = math.nan if tau is None else float(tau)
        self._thr = _threshold_units(self._tau, self.cfg.window, self._half)

    # ------------------------------------------------------------------ results
    @property
    def tokens_B(self) -> torch.Tensor:
        """Tokens seen per row (int64)."""
        return self._ops.torch(self._n_B)

    @property
    def fire_B(self) -> torch.Tensor:
        """Fire position per row (int64, -1 = not fired)."""
        ops = self._ops
        return ops.torch(ops.where(self._fire_B < _NOT_FIRED, self._fire_B, -1))

    @property
    def fired_B(self) -> torch.Tensor:
        return self._ops.torch(self._fire_B < _NOT_FIRED)

    @property
    def onset_B(self) -> torch.Tensor:
        """Onset per row: fire - T - W + 2, or -1."""
        return onset_from_fire(self.fire_B, self.cfg)

    @property
    def keep_B(self) -> torch.Tensor:
        """Tokens to keep for training per row under cfg.keep (tokens seen if not fired)."""
        return kept_tokens(self.fire_B, self.tokens_B, self.cfg)

    @property
    def nonfinite_count(self) -> int:
        """Valid tokens with unusable KL (NaN, +-inf, |d| > 1024 nats) seen since construction."""
        return int(self._tokens_seen) - int(self._finite_seen)

    @property
    def last_low_BC(self) -> torch.Tensor | None:
        """Low flags of the windows ending at the tokens of the last update (False where invalid;
        values at i < W-1, where no window exists, are meaningless). Used by replay/phases."""
        return None if self._last_low is None else self._ops.torch(self._last_low)

    # ------------------------------------------------------------------ update
    def _consts(self, c: int) -> tuple[Any, ...]:
        if c not in self._consts_cache:
            ops = self._ops
            idx = ops.arange(c)
            self._consts_cache[c] = (idx, idx - self.cfg.persistence, ops.arange(self.cfg.window))
        return self._consts_cache[c]

    def update(self, kl_BC: torch.Tensor | np.ndarray, valid_BC: torch.Tensor | np.ndarray | None = None,
               *, tau_B: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Consume C new tokens per row; returns fired_B (bool: fired at any token so far).

        kl_BC: reverse KL of the new tokens (float, any dtype). valid_BC: False where a row has no
        token (ended); the valid tokens of a row must be a prefix of the chunk; None means all
        valid (a few ops cheaper). tau_B: per-row threshold for this call (NaN = inactive row)
        instead of the one from `set_tau`. A row that fired keeps its first fire position.
        """
        b, c = kl_BC.shape
        if b != self._n_B.shape[0]:
            raise ValueError(f"update: kl_BC has {b} rows, detector has {self.num_rows}")
        if c > self.max_chunk:
            raise ValueError(f"update: chunk of {c} tokens exceeds max_chunk={self.max_chunk}")
        if isinstance(kl_BC, torch.Tensor) and kl_BC.device != self.device:
            self.to(kl_BC.device)
        ops = self._ops
        if c == 0:
            return ops.torch(self._fire_B < _NOT_FIRED)
        kl_BC = ops.arr(kl_BC)
        idx_C, idx_minus_t_C, idx_W = self._consts(c)
        w = self.cfg.window

        # Quantise: trunc(d * 2**24) when |d| <= 1024 nats, else (NaN, inf, absurd) poison.
        # Scaling by a power of two is exact, so fp32 and fp64 copies of a value agree.
        y_BC = kl_BC * KL_SCALE
        ok_BC = abs(y_BC) <= _QMAX_F
        x_BL = ops.cat([self._hist_BW, ops.to_int(ops.where(ok_BC, y_BC, self._poison))], 1)
        cs_BL = x_BL.cumsum(1)
        win_BC = cs_BL[:, w:] - cs_BL[:, :c]  # sum of the W values ending at each new token

        thr: Any = self._thr
        if tau_B is not None:
            tau_np = tau_B.detach().cpu().numpy() if isinstance(tau_B, torch.Tensor) else tau_B
            thr = ops.arr(_threshold_units_array(tau_np, w, self._half)[:, None])
        low_BC = win_BC < thr
        if valid_BC is not None:
            valid_BC = ops.arr(valid_BC, bool)
            if ops.name == "numpy" and valid_BC.all():
                valid_BC = None  # cheap check on CPU; the all-valid path is ~8 ops shorter
            else:
                low_BC &= valid_BC
        self._last_low = low_BC

        # lb = last break (non-low window) at or before each token, relative to the chunk start.
        # The carried value is max(true last break, W-2, L0-1-T), so "T low windows ending here
        # and i+1 >= L0" is the single test i - lb >= T, and i - lb == T at the first fire.
        lbrel_B1 = self._lbrel_B1
        lb_BC = ops.maximum(ops.cummax(ops.where(low_BC, lbrel_B1, idx_C)), lbrel_B1)
        cond_BC = lb_BC <= idx_minus_t_C
        n_B = self._n_B
        cand_B = ops.where(cond_BC.any(1), ops.first_true(cond_BC) + n_B, _NOT_FIRED)
        self._fire_B = ops.minimum(self._fire_B, cand_B)  # a fired row keeps its first fire

        if valid_BC is None:
            self._hist_BW = x_BL[:, c:]
            self._lbrel_B1 = lb_BC[:, -1:] - c
            self._n_B = n_B + c
            self._finite_seen += ops.count(ok_BC)
            self._tokens_seen += b * c
        else:
            nvalid_B = valid_BC.sum(1)
            nv_B1 = nvalid_B[:, None]
            self._hist_BW = ops.gather(x_BL, nv_B1 + idx_W)
            lb_last_B1 = ops.gather(lb_BC, ops.maximum(nv_B1 - 1, 0 * nv_B1)) - nv_B1
            self._lbrel_B1 = ops.where(nv_B1 > 0, lb_last_B1, lbrel_B1)
            self._n_B = n_B + nvalid_B
            self._finite_seen += ops.count(ok_BC & valid_BC)
            self._tokens_seen += nvalid_B.sum()
        return ops.torch(self._fire_B < _NOT_FIRED)
