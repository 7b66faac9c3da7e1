"""Which threshold tau an offline analysis segments a store with.

Heatmap marks, phases and the low-KL run statistics all need tau. A KAT run records the tau in
force for each rollout (the `tau` column); a plain OPD run, a warm-up step or a `record` store has
NaN there. The rule used everywhere (`resolve_tau`):

* ``auto`` (default): the recorded tau where it is finite, else one store-wide tau derived from
  the rollouts at hand (`derive_tau`);
* ``derived``: the store-wide derived tau for every rollout (comparable across stages: one scale);
* a number: that fixed tau for every rollout.

`derive_tau` applies the run's KAT rule to the rollouts as one buffer: with the detector's
``buffer_values`` / ``threshold_of`` when this kat_diag has them (what KAT online would push and
the quantile it takes), else the ``cfg.quantile`` quantile of all stride-W window means (the
earlier variant's buffer without its FIFO cap). One tau for the whole store, rather than the step
by step tau of `kat-diag replay`, keeps early and late training on the same scale, so a change in
how often KL falls below it is a change in the KL, not in the threshold.
"""

from __future__ import annotations

import math

import numpy as np

from kat_diag.detector import KATConfig
from kat_diag.traces import TraceReader

TAU_MODES = ("auto", "derived")


def window_means(kl_values: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Means of the non-overlapping windows ending at positions W-1, 2W-1, ... of every rollout.

    Windows holding an unusable KL (NaN, inf, |d| > 1024 nats, as the detector counts them) are
    left out. Rollouts are concatenated in order.
    """
    values = np.asarray(kl_values, dtype=np.float64)
    offs = np.asarray(offsets, dtype=np.int64)
    n_win = np.diff(offs) // window
    if n_win.sum() == 0:
        return np.zeros(0)
    bad = ~np.isfinite(values) | (np.abs(values) > 1024.0)
    csum = np.concatenate([[0.0], np.cumsum(np.where(bad, 0.0, values))])
    cbad = np.concatenate([[0], np.cumsum(bad)])
    rollout = np.repeat(np.arange(len(n_win)), n_win)
    k = np.arange(int(n_win.sum())) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    end = offs[:-1][rollout] + (k + 1) * window  # exclusive end of each window
    ok = cbad[end] == cbad[end - window]
    return ((csum[end] - csum[end - window]) / window)[ok]


def derive_tau(kl_values: np.ndarray, offsets: np.ndarray, cfg: KATConfig) -> float:
    """One tau for these rollouts under cfg's rule (see module docstring); NaN if undefined."""
    try:
        from kat_diag.detector import buffer_values, threshold_of  # type: ignore[attr-defined]
    except ImportError:
        means = window_means(kl_values, offsets, cfg.window)
        return float(np.quantile(means, cfg.quantile)) if means.size else math.nan
    return float(threshold_of(buffer_values(np.asarray(kl_values), np.asarray(offsets), cfg), cfg))


def parse_tau(value: str | float | None) -> str | float:
    """'auto' | 'derived' | a positive number (CLI spelling) -> mode or float."""
    if value is None:
        return "auto"
    if isinstance(value, (int, float)):
        tau = float(value)
    elif value in TAU_MODES:
        return value
    else:
        try:
            tau = float(value)
        except ValueError:
            raise ValueError(f"--tau must be 'auto', 'derived' or a number, got {value!r}") from None
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"--tau must be a positive number, got {value!r}")
    return tau


def resolve_tau(recorded: np.ndarray, mode: str | float, derived: float) -> np.ndarray:
    """Per-rollout tau (float64) from the recorded column, the mode and the store-derived tau."""
    recorded = np.asarray(recorded, dtype=np.float64)
    if not isinstance(mode, str):
        return np.full(recorded.shape, float(mode))
    if mode == "derived":
        return np.full(recorded.shape, derived)
    if mode != "auto":
        raise ValueError(f"unknown tau mode {mode!r}")
    return np.where(np.isfinite(recorded), recorded, derived)


def needs_derived(recorded: np.ndarray, mode: str | float) -> bool:
    """Whether `resolve_tau` will use the derived tau for any of these rollouts."""
    if not isinstance(mode, str):
        return False
    return mode == "derived" or not bool(np.all(np.isfinite(np.asarray(recorded, dtype=np.float64))))


def store_tau(reader: TraceReader, cfg: KATConfig, rollout_ids: np.ndarray, *, sample: int = 4096,
              seed: int = 0) -> float:
    """`derive_tau` over a seeded sample of up to ``sample`` of the given rollouts (read lazily).

    Every analysis of a store calls this with the ids of its scalar pass in store order and the
    same seed, so heatmap and phases segment with the same derived tau.
    """
    from kat_diag.analysis.store import read_rollouts, sample_rows

    pick = sample_rows(len(rollout_ids), sample, seed)
    kl = read_rollouts(reader, np.asarray(rollout_ids)[pick], ["kl"])["kl"]
    return derive_tau(kl.values, kl.offsets, cfg)
