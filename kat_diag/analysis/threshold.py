"""Which threshold tau an offline analysis segments a store with.

Heatmap marks, phases and the low-KL run statistics all need tau. A KAT run records the tau in
force for each rollout (the `tau` column); a plain OPD run, a warm-up step or a `record` store has
NaN there. The rule used everywhere (`resolve_tau`):

* ``auto`` (default): the recorded tau where it is finite, else one store-wide tau derived from
  the rollouts at hand (`derive_tau`);
* ``derived``: the store-wide derived tau for every rollout (comparable across stages: one scale);
* a number: that fixed tau for every rollout.

`derive_tau` applies the run's KAT rule to the rollouts at hand as one buffer: tau = the
``cfg.tau_quantile`` quantile of what they would push into KAT's buffer
(`kat_diag.kat.detector.buffer_values`: each rollout's minimum window mean under the paper's rule, or
its stride-W window means under the `windows` statistic), over the whole sample rather than a FIFO
of the last B, and without the online B_min warm-up guard (offline, the sample is the buffer; with no
usable window at all tau is NaN and nothing is low). One tau for the whole store, rather than the
step-by-step tau of `kat-diag replay`, keeps early and late training on the same scale, so a change
in how often KL falls below it is a change in the KL, not in the threshold.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import buffer_values, threshold_of
from kat_diag.traces.reader import TraceReader

TAU_MODES = ("auto", "derived")


def derive_tau(kl_values: np.ndarray, offsets: np.ndarray, cfg: KATConfig) -> float:
    """One tau for these rollouts under cfg's rule (see module docstring); NaN if undefined."""
    values = buffer_values(np.asarray(kl_values), np.asarray(offsets, dtype=np.int64), cfg)
    return float(threshold_of(values, dataclasses.replace(cfg, min_fill=1)))


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
