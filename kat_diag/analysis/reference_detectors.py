"""Reference detectors for scoring KAT: what would a detector without the KL signal do?

KAT's claim is that persistent low teacher-student KL marks degenerate agreement. In the embedded
world most of that agreement is a repetition loop, which a detector with no teacher at all can
also see, and a model's own confidence is a second cheap signal. These detectors decide, per
rollout of a trace store, a fire position and an onset (the first token not trained on), in the
same form as `kat_diag.kat.replay.ReplayResult`, so `kat_diag.analysis.sweep` scores them with
KAT on the same rollouts:

* `ngram_repeat` (no teacher, no model): fire at the first token that completes an n-gram already
  seen `count` times earlier in the same rollout; onset = the first token of that repeated n-gram.
  Vectorised with 64-bit n-gram hashes and one sort.
* `length_cut` (no signal at all): fire at token L of every rollout that reaches it, onset = L:
  the prefix budget as a detector. In a world where wrong rollouts loop to the budget and right
  ones stop early, length alone separates them; this row says how much of a detector's score
  length explains.
* `signal_rule`: KAT's own rule (window mean of a per-token signal persistently below the
  quantile threshold of rollout minima, W / T / L0, `kat_diag.kat.replay.replay`) applied to
  another per-token signal than the KL: `student_entropy` (the student's confidence, no teacher)
  or `teacher_entropy` (the teacher's confidence, its entropy over the stored top-n tokens plus
  one tail bucket: a lower bound of the full entropy, exact when the top-n hold all the mass).
  Same machinery, same tuning grid: only the signal differs from KAT.

Layout: the signals (`teacher_entropy_topn`), the detectors, `DetectorResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kat_diag.kat.config import KATConfig


@dataclass(frozen=True)
class DetectorResult:
    """Per-rollout decisions (int64 arrays; onset = fire = -1: not fired). `keep`: tokens kept for
    training (the onset when fired, or fire + 1 under KAT's keep = "fire"; the length otherwise)."""

    onset: np.ndarray
    fire: np.ndarray
    length: np.ndarray
    keep: np.ndarray


def teacher_entropy_topn(top_probs_NK: np.ndarray) -> np.ndarray:
    """Teacher entropy per token from its top-n probabilities plus one tail bucket holding the rest:
    -sum_i p_i log p_i - r log r, r = 1 - sum_i p_i (clipped at 0). A lower bound of the entropy."""
    p = np.clip(np.asarray(top_probs_NK, dtype=np.float64), 0.0, 1.0)
    r = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1) - np.where(r > 0, r * np.log(r), 0.0)
    return h


def ngram_repeat(token_ids: np.ndarray, offsets: np.ndarray, n: int, count: int = 1,
                 min_length: int = 0) -> DetectorResult:
    """Fire at the first position t (t + 1 >= min_length) whose n-gram tokens[t-n+1..t] occurred at
    least `count` times earlier in the same rollout (earlier occurrences may overlap it);
    onset = t - n + 1. Ragged input: rollout k is token_ids[offsets[k]:offsets[k+1]]."""
    if n < 1 or count < 1:
        raise ValueError(f"ngram_repeat: n={n} and count={count} must be >= 1")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    offs = np.asarray(offsets, dtype=np.int64)
    n_roll = len(offs) - 1
    length = np.diff(offs)
    fire = np.full(n_roll, -1, dtype=np.int64)
    if ids.shape[0] < n or n_roll == 0:
        return DetectorResult(fire.copy(), fire, length, length.copy())
    # n-gram ending at flat position e = g + n - 1 for every start g; 64-bit hash (wrapping products).
    mult = np.random.default_rng(12345).integers(1, 2**62, size=n, dtype=np.int64) | 1
    win = np.lib.stride_tricks.sliding_window_view(ids, n)  # [N - n + 1, n]
    with np.errstate(over="ignore"):
        h = (win * mult).sum(-1)
    end = np.arange(n - 1, ids.shape[0])
    roll = np.searchsorted(offs, end, side="right") - 1
    pos = end - offs[roll]  # position of the n-gram's last token in its rollout
    ok = pos >= n - 1  # inside one rollout
    h, roll, pos = h[ok], roll[ok], pos[ok]
    # Occurrence number of each n-gram within its rollout: sort by (rollout, hash, position).
    order = np.lexsort((pos, h, roll))
    hs, rs = h[order], roll[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (hs[1:] != hs[:-1]) | (rs[1:] != rs[:-1])
    group_start = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
    occurrence = np.empty(len(order), dtype=np.int64)
    occurrence[order] = np.arange(len(order)) - group_start
    hit = (occurrence >= count) & (pos + 1 >= min_length)
    big = np.iinfo(np.int64).max
    first = np.full(n_roll, big, dtype=np.int64)
    np.minimum.at(first, roll[hit], pos[hit])
    fire = np.where(first < big, first, -1)
    onset = np.where(fire >= 0, fire - n + 1, -1)
    return DetectorResult(onset, fire, length, np.where(fire >= 0, onset, length))


def length_cut(offsets: np.ndarray, budget: int) -> DetectorResult:
    """Fire at position `budget` (the first token past the budget) of every rollout longer than
    `budget`; onset = keep = budget (the rollout is trained on its first `budget` tokens)."""
    if budget < 0:
        raise ValueError(f"length_cut: budget={budget} must be >= 0")
    length = np.diff(np.asarray(offsets, dtype=np.int64))
    fire = np.where(length > budget, budget, -1).astype(np.int64)
    return DetectorResult(fire.copy(), fire, length, np.where(fire >= 0, budget, length))


def signal_rule(signal: np.ndarray, offsets: np.ndarray, cfg: KATConfig, steps: np.ndarray | None = None
                ) -> tuple[DetectorResult, np.ndarray]:
    """KAT's rule on another per-token signal (low = agreement/confidence): the threshold from the
    signal's own buffer values (`kat_diag.analysis.trap.step_taus`), decisions by the same replay.
    Returns the decisions and the per-rollout tau."""
    from kat_diag.analysis.trap import step_taus
    from kat_diag.kat.replay import replay

    offs = np.asarray(offsets, dtype=np.int64)
    steps = np.zeros(len(offs) - 1, dtype=np.int64) if steps is None else np.asarray(steps)
    tau = step_taus(signal, offs, steps, cfg)
    res = replay(signal, offs, cfg, tau)
    return DetectorResult(res.onset, res.fire, res.length, res.keep), tau
