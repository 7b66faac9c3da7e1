"""Phase segmentation of rollouts (docs/kat.md#phases): pre-agreement, agreement, post-agreement.

Every analysis (heatmap marks, gradient geometry per phase, teacher vocabulary per phase)
needs to know which tokens of a full, untruncated trace belong to which phase, with hindsight.
Per rollout of length n, with the detector replayed at the rollout's tau (`kat_diag.analysis.replay`):

- not fired: the whole rollout is pre-agreement, [0, n);
- fired: pre = [0, onset); agreement = [onset, j), where j is the first index >= fire whose
  window is not low (mean >= tau, or an unusable KL in it), or n if the low run lasts to the end;
  post = [j, n).

onset is the detector's onset, fire - T - W + 2 (see `kat_diag.kat.detector`): the same number the
online run used to cut the rollout. The three spans partition [0, n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kat_diag.kat.config import KATConfig
from kat_diag.kat.replay import check_ragged, replay

PRE, AGREEMENT, POST = 0, 1, 2
PHASE_NAMES: tuple[str, ...] = ("pre", "agreement", "post")  # index = the phase label


@dataclass(frozen=True)
class Phases:
    """Per-rollout phase boundaries (int64 arrays): pre = [0, pre_end), agreement =
    [pre_end, agree_end), post = [agree_end, length)."""

    pre_end: np.ndarray
    agree_end: np.ndarray
    length: np.ndarray
    onset: np.ndarray  # -1 = not fired
    fire: np.ndarray


def segment(kl_values: np.ndarray, offsets: np.ndarray, cfg: KATConfig,
            tau: float | np.ndarray) -> Phases:
    """Phase boundaries for every rollout of a ragged trace (see `kat_diag.analysis.replay.replay`)."""
    values, offs = check_ragged(kl_values, offsets)
    res = replay(values, offs, cfg, tau, return_low=True)
    assert res.low is not None
    fired = res.fire >= 0
    # Next non-low token at or after each position (flat), by a reversed running minimum; a
    # rollout's own end caps it, so running into the next rollout cannot matter.
    n_tok = values.shape[0]
    pos = np.arange(n_tok, dtype=np.int64)
    next_break = np.minimum.accumulate(np.where(res.low, n_tok, pos)[::-1])[::-1]
    starts = offs[:-1]
    at_fire = np.clip(starts + np.maximum(res.fire, 0), 0, max(n_tok - 1, 0))
    j_global = np.minimum(next_break[at_fire] if n_tok else starts, offs[1:])
    pre_end = np.where(fired, res.onset, res.length)
    agree_end = np.where(fired, j_global - starts, res.length)
    return Phases(pre_end=pre_end.astype(np.int64), agree_end=agree_end.astype(np.int64),
                  length=res.length, onset=res.onset, fire=res.fire)


def phase_labels(offsets: np.ndarray, pre_end: np.ndarray, agree_end: np.ndarray) -> np.ndarray:
    """Per-token phase (int8: 0 pre, 1 agreement, 2 post) for tokens offsets[0]..offsets[-1]."""
    offs = np.asarray(offsets, dtype=np.int64)
    length = np.diff(offs)
    rollout = np.repeat(np.arange(length.shape[0]), length)
    pos = np.arange(offs[-1] - offs[0], dtype=np.int64) - (offs[:-1] - offs[0])[rollout]
    pre_end = np.asarray(pre_end, dtype=np.int64)[rollout]
    agree_end = np.asarray(agree_end, dtype=np.int64)[rollout]
    return ((pos >= pre_end).astype(np.int8) + (pos >= agree_end).astype(np.int8)).astype(np.int8)


def phase_of(phases: Phases, offsets: np.ndarray) -> np.ndarray:
    """`phase_labels` for a `Phases` result."""
    return phase_labels(offsets, phases.pre_end, phases.agree_end)
