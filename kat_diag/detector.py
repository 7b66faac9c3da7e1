"""The KAT detector: persistent low-KL agreement, detected online, vectorised over a batch.

KAT (KL Agreement Trap Termination, DESIGN.md §2) stops a rollout once the windowed reverse KL
has stayed below an adaptive threshold for long enough. This module holds the pieces that
decision needs and nothing model-specific, so the rollout engine (through
`kat_diag.termination`), offline replay (`kat_diag.replay`) and phase segmentation
(`kat_diag.phases`) all run the very same code:

- `KATConfig`: the parameters (W, T, L0, K, B, eta, keep), validated when built.
- `AdaptiveThreshold`: the FIFO buffer of recent window means and the per-step quantile tau.
- `StreamingDetector`: per-rollout state for a batch; `update` consumes a chunk of C new tokens
  per row and takes exactly the decisions that feeding the tokens one by one would take.

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
that float64 product. A token whose KL is NaN, +-inf or beyond +-1024 nats (no real model gives
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Fixed-point quantisation of per-token KL: resolution 2**-24 nats, usable range +-1024 nats.
KL_SCALE_BITS = 24
KL_SCALE = float(2**KL_SCALE_BITS)
KL_LIMIT = 1024.0
_QMAX_BITS = KL_SCALE_BITS + 10  # log2(KL_LIMIT * KL_SCALE)
_QMAX_F = KL_LIMIT * KL_SCALE
MAX_WINDOW = 4096  # keeps window sums and poison values inside int64 with room for long chunks
_NOT_FIRED = 2**62  # internal sentinel: min() keeps the first fire without a branch
_FLUSH_EVERY = 256  # pending updates before stride-window means are extracted in one pass

_KEEP_MODES = ("onset", "fire")


@dataclass(frozen=True)
class KATConfig:
    """KAT parameters (DESIGN.md §2). See README "KAT parameters" for what each trades off."""

    window: int = 16  # W: tokens per window mean
    persistence: int = 8  # T: consecutive low windows needed to fire
    min_length: int = 32  # L0: never fire before this many tokens have been seen
    warmup_steps: int = 5  # K: training steps during which KAT only fills its buffer
    buffer_size: int = 4096  # B: FIFO capacity, in window means
    quantile: float = 0.2  # eta: tau = quantile_eta(buffer)
    keep: str = "onset"  # train on [0, onset) ("onset") or [0, fire] ("fire")

    def __post_init__(self) -> None:
        def check(name: str, value: Any, ok: bool, rule: str) -> None:
            if not ok:
                raise ValueError(f"KATConfig.{name}={value!r}: must be {rule}")

        for name in ("window", "persistence", "min_length", "warmup_steps", "buffer_size"):
            value = getattr(self, name)
            is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            check(name, value, is_int, "an integer")
        check("window", self.window, 1 <= self.window <= MAX_WINDOW, f"in [1, {MAX_WINDOW}]")
        check("persistence", self.persistence, self.persistence >= 1, ">= 1")
        check("min_length", self.min_length, self.min_length >= 0, ">= 0")
        check("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        check("buffer_size", self.buffer_size, self.buffer_size >= 1, ">= 1")
        q = self.quantile
        is_real = isinstance(q, (int, float, np.floating)) and not isinstance(q, bool)
        check("quantile", q, is_real and math.isfinite(q) and 0.0 < q < 1.0,
              "a number in the open interval (0, 1)")
        check("keep", self.keep, self.keep in _KEEP_MODES, f"one of {_KEEP_MODES}")

    @property
    def fire_lag(self) -> int:
        """fire - onset for every fired rollout (= T + W - 2)."""
        return self.persistence + self.window - 2


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

    Clamped to [-half, half] (usable sums lie well inside, poisoned ones above); NaN gives
    -half - 1 so that nothing is low.
    """
    if math.isnan(tau):
        return -half - 1
    x = tau * float(window * KL_SCALE)
    return half if x >= half else -half if x <= -half else math.ceil(x)


def _threshold_units_array(tau_B: np.ndarray, window: int, half: int) -> np.ndarray:
    """Vector version of `_threshold_units` (same float64 product, same ceil, same clamps)."""
    x = np.asarray(tau_B, dtype=np.float64) * float(window * KL_SCALE)
    t = np.ceil(np.clip(np.nan_to_num(x, nan=0.0), -float(half), float(half))).astype(np.int64)
    return np.where(np.isnan(x), -half - 1, t)


class AdaptiveThreshold:
    """FIFO buffer of recent window means; tau = quantile_eta(buffer), fixed within a step.

    The buffer receives the means of non-overlapping windows (i = W-1, 2W-1, ... of every rollout,
    usable windows only) and keeps the last `buffer_size`. `begin_step` recomputes tau once, so
    every rollout of a training step sees the same threshold; values observed during a step count
    from the next step on. Inactive during the first K steps (it only observes) and while the
    buffer is empty (tau undefined), so an empty buffer never fires.
    """

    def __init__(self, cfg: KATConfig) -> None:
        self.cfg = cfg
        self._buffer = torch.empty(0, dtype=torch.float64)
        self._tau = math.nan
        self._step = -1

    @property
    def buffer(self) -> torch.Tensor:
        """The window means currently held, oldest first (float64, CPU)."""
        return self._buffer

    @property
    def tau(self) -> float:
        """tau of the current step; NaN before the first `begin_step` or with an empty buffer."""
        return self._tau

    @property
    def step(self) -> int:
        """The step given to the last `begin_step` (-1 before any)."""
        return self._step

    @property
    def active(self) -> bool:
        """True when the detector may fire in the current step (warm-up over, tau defined)."""
        return self._step >= self.cfg.warmup_steps and not math.isnan(self._tau)

    @property
    def effective_tau(self) -> float:
        """tau when active, else NaN: the value to hand to `StreamingDetector.set_tau`."""
        return self._tau if self.active else math.nan

    def observe(self, values: torch.Tensor | np.ndarray | list[float]) -> int:
        """Append window means, oldest first (non-finite ones are ignored); returns the count added."""
        v = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1).cpu()
        v = v[torch.isfinite(v)]
        cap = self.cfg.buffer_size
        if v.numel() >= cap:
            self._buffer = v[-cap:].clone()
        elif v.numel() > 0:
            self._buffer = torch.cat([self._buffer, v])[-cap:].clone()
        return int(v.numel())

    def begin_step(self, step: int) -> float:
        """Start training step `step`: recompute tau from the buffer and return it."""
        self._step = int(step)
        if self._buffer.numel() == 0:
            self._tau = math.nan
        else:
            # numpy's linear interpolation: no size limit, deterministic.
            self._tau = float(np.quantile(self._buffer.numpy(), self.cfg.quantile))
        return self._tau

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
    Stride-W window means (for `AdaptiveThreshold.observe`) are extracted lazily, in one batched
    pass, by `pop_window_means`; `collect_means=False` turns that bookkeeping off (replay).
    Inputs may be torch tensors or numpy arrays; results are torch tensors on `device`.
    `backend` = "auto" (numpy on CPU, torch elsewhere), "numpy" (CPU only) or "torch".
    """

    def __init__(self, cfg: KATConfig, batch_size: int = 0, *, device: str | torch.device = "cpu",
                 collect_means: bool = True, backend: str = "auto") -> None:
        self.cfg = cfg
        self.collect_means = collect_means
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
        self._pending: list[tuple[Any, Any, Any]] = []  # (win_BC, n_B, nvalid_B) per update
        self._means_done: list[Any] = []  # extracted stride-window sums, not yet popped
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
        """Drop every row (end of a step); counters and pending window means are kept."""
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
        self._pending = [(move(a), move(b), move(c)) for a, b, c in self._pending]
        self._means_done = [move(m) for m in self._means_done]
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

    def pop_window_means(self) -> torch.Tensor:
        """Means of the stride-W windows (i = W-1, 2W-1, ...) seen since the last pop.

        float64 on `device`, usable windows only, in update order (row-major within an update).
        """
        self._flush_pending()
        done, self._means_done = self._means_done, []
        if not done:
            return torch.empty(0, dtype=torch.float64, device=self.device)
        ops = self._ops
        return ops.torch(ops.cat(done, 0)).to(torch.float64) / float(self.cfg.window * KL_SCALE)

    def _flush_pending(self) -> None:
        """Extract the stride-W window sums of the pending updates, one batched pass per run of
        same-shape updates (a few ops per run instead of a gather per update)."""
        pending, self._pending = self._pending, []
        ops, w = self._ops, self.cfg.window
        start = 0
        while start < len(pending):
            key = (tuple(pending[start][0].shape), pending[start][2] is None)
            end = start + 1
            while end < len(pending) and (tuple(pending[end][0].shape), pending[end][2] is None) == key:
                end += 1
            run = pending[start:end]
            win_EBC = ops.cat([r[0][None] for r in run], 0)
            n_EB1 = ops.cat([r[1][None] for r in run], 0)[..., None]
            idx_C = ops.arange(key[0][1])
            mask = ((n_EB1 + idx_C + 1) % w == 0) & (win_EBC < self._half)
            if not key[1]:
                mask &= idx_C < ops.cat([r[2][None] for r in run], 0)[..., None]
            self._means_done.append(win_EBC[mask])
            start = end

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

        nvalid_B = None
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
        if self.collect_means:
            self._pending.append((win_BC, n_B, nvalid_B))
            if len(self._pending) >= _FLUSH_EVERY:  # bounds memory to ~_FLUSH_EVERY chunks
                self._flush_pending()
        return ops.torch(self._fire_B < _NOT_FIRED)
