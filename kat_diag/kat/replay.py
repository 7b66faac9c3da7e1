"""Offline replay of the KAT detector over recorded per-token KL.

Questions like "where would KAT have fired on this OPD run?", "how does onset move with eta?" or
the phase segmentation of docs/kat.md#phases need the detector's decisions on stored traces, without the
models. `replay` runs the *same* `StreamingDetector` the rollout engine uses, so on the same
tokens and the same tau it returns exactly what the online run decided (including rollouts
that were truncated online at fire: the recorded prefix contains every token the decision
depended on). Input is ragged: one flat array of per-token KL and offsets, as the trace store
keeps it; rollouts are sorted by length and padded into blocks so millions of tokens replay
in a few vectorised calls.

`ThresholdReplay` replays KAT's adaptive threshold over recorded steps the way training ran it:
each step's tau from the buffer of the steps before it, and after the step the buffer fed with
what each rollout kept in its trace (up to and including its fire), in rollout-id order. Every
offline path that replays the buffer (`kat-diag replay`, `kat-diag trap`) goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import AdaptiveThreshold, StreamingDetector, buffer_values, kept_tokens


@dataclass(frozen=True)
class ReplayResult:
    """Per-rollout decisions (int64 arrays of length n_rollouts; -1 = not fired)."""

    onset: np.ndarray
    fire: np.ndarray
    keep: np.ndarray  # tokens kept for training under cfg.keep; the full length if not fired
    length: np.ndarray
    # Per token (aligned with kl_values), only with return_low=True: the window ending at this
    # token exists, is usable and has mean < tau. False outside rollouts.
    low: np.ndarray | None = None

    @property
    def fired(self) -> np.ndarray:
        return self.fire >= 0


def check_ragged(kl_values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the ragged layout: rollout k is kl_values[offsets[k]:offsets[k+1]]."""
    values = np.asarray(kl_values)
    offs = np.asarray(offsets)
    if values.ndim != 1:
        raise ValueError(f"kl_values must be 1-D (concatenated tokens), got shape {values.shape}")
    if offs.ndim != 1 or offs.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D with n_rollouts + 1 entries, got shape {offs.shape}")
    if not np.issubdtype(offs.dtype, np.integer):
        raise ValueError(f"offsets must be integers, got {offs.dtype}")
    offs = offs.astype(np.int64)
    if offs[0] < 0 or offs[-1] > values.shape[0] or np.any(np.diff(offs) < 0):
        raise ValueError("offsets must be non-decreasing and within [0, len(kl_values)]")
    return values, offs


def replay(kl_values: np.ndarray, offsets: np.ndarray, cfg: KATConfig, tau: float | np.ndarray, *,
           return_low: bool = False, max_block_tokens: int = 1 << 21) -> ReplayResult:
    """Run the KAT detector over ragged recorded KL.

    kl_values: float per-token KL, all rollouts concatenated (float32 or float64: both give the
    same decisions). offsets: int64, length n_rollouts + 1. tau: one threshold or one per rollout
    (NaN = detector inactive for that rollout, e.g. a warm-up step). return_low adds the
    per-token low flags used by `kat_diag.kat.phases`. max_block_tokens bounds the padded block
    (rows x longest length) processed at once.
    """
    values, offs = check_ragged(kl_values, offsets)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    n_roll = offs.shape[0] - 1
    length = np.diff(offs)
    tau_R = np.broadcast_to(np.asarray(tau, dtype=np.float64), (n_roll,))
    fire = np.full(n_roll, -1, dtype=np.int64)
    low = np.zeros(values.shape[0], dtype=bool) if return_low else None

    order = np.argsort(length, kind="stable")
    start = int(np.searchsorted(length[order], 1))  # zero-length rollouts cannot fire
    probe = StreamingDetector(cfg, backend="numpy")
    col_chunk = max(1, min(probe.max_chunk, max_block_tokens))
    while start < n_roll:
        # Block of rollouts of similar length: rows x longest <= max_block_tokens (at least 1 row).
        rows = max(1, max_block_tokens // int(length[order[start]]))
        end = min(n_roll, start + rows)
        while end - start > 1 and (end - start) * int(length[order[end - 1]]) > max_block_tokens:
            end = start + max(1, max_block_tokens // int(length[order[end - 1]]))
        idx_R = order[start:end]
        _replay_block(values, offs[idx_R], length[idx_R], tau_R[idx_R], cfg, col_chunk, fire, idx_R, low)
        start = end

    onset = np.where(fire >= 0, fire - cfg.fire_lag, -1)
    keep = kept_tokens(fire, length, cfg).astype(np.int64)
    return ReplayResult(onset=onset, fire=fire, keep=keep, length=length, low=low)


def _replay_block(values: np.ndarray, starts_R: np.ndarray, len_R: np.ndarray, tau_R: np.ndarray,
                  cfg: KATConfig, col_chunk: int, fire_out: np.ndarray, idx_R: np.ndarray,
                  low_out: np.ndarray | None) -> None:
    det = StreamingDetector(cfg, len(idx_R), backend="numpy")
    longest = int(len_R.max())
    for c0 in range(0, longest, col_chunk):
        pos_C = np.arange(c0, min(longest, c0 + col_chunk), dtype=np.int64)
        valid_RC = pos_C < len_R[:, None]
        flat_RC = np.where(valid_RC, starts_R[:, None] + pos_C, 0)
        kl_RC = np.where(valid_RC, values[flat_RC], 0.0)
        det.update(kl_RC, valid_RC, tau_B=tau_R)
        if low_out is not None:
            low_RC = det.last_low_BC.numpy() & valid_RC & (pos_C >= cfg.window - 1)
            low_out[flat_RC[valid_RC]] = low_RC[valid_RC]
    fire_out[idx_R] = det.fire_B.numpy()


class ThresholdReplay:
    """KAT's FIFO threshold buffer over recorded steps, fed as online (see the module docstring).

        tr = ThresholdReplay(cfg)
        for each step, in increasing order:
            tau = tr.begin_step(step)                     # NaN before step K or below B_min values
            fire = replay(kl, offsets, cfg, tau).fire     # (or any replay of these rollouts at tau)
            tr.end_step(kl, offsets, fire, rollout_ids)   # the buffer gets the kept tokens' values

    Online, a rollout cut at fire stores (and pushes) its tokens up to fire; a replayed rollout of
    an uncut trace (e.g. plain OPD) must push the same, so the values are taken from
    [0, fire] of each fired rollout and from the whole of the others. Rollouts are pushed in
    rollout-id order (rank, then position in the step), as online.
    """

    def __init__(self, cfg: KATConfig) -> None:
        self.cfg = cfg
        self.threshold = AdaptiveThreshold(cfg)

    def begin_step(self, step: int) -> float:
        """The threshold in force at `step` (NaN: inactive)."""
        return self.threshold.begin_step(step)

    def end_step(self, kl_values: np.ndarray, offsets: np.ndarray, fire: np.ndarray,
                 rollout_ids: np.ndarray | None = None) -> int:
        """Push what this step's rollouts contribute; returns the number of values added."""
        values, offs = check_ragged(kl_values, offsets)
        fire = np.asarray(fire, dtype=np.int64)
        length = np.diff(offs)
        kept = np.where(fire >= 0, np.minimum(fire + 1, length), length)
        order = (np.arange(len(length)) if rollout_ids is None
                 else np.argsort(np.asarray(rollout_ids), kind="stable"))
        new_len = kept[order]
        new_offs = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(new_len, out=new_offs[1:])
        pos = np.repeat(offs[:-1][order] - new_offs[:-1], new_len) + np.arange(new_offs[-1])
        return self.threshold.observe(buffer_values(values[pos], new_offs, self.cfg))
