"""Stage-wise supervision: train on chosen phases of untruncated rollouts (`--supervise PHASES`).

Why it exists: the paper's ablation trains on one phase only (pre-agreement, agreement or
post-agreement tokens) or on pre + agreement, to show which tokens carry the useful signal. The
same mechanism answers a question the paper leaves open: is KAT's gain from *filtering
supervision* or from *generating less*? Generate every rollout in full (termination `none`) and
train only on what KAT would have kept, `pre` = [0, onset): same supervision as KAT, none of its
savings.

How: `PhaseSupervision` wraps the `none` policy (same interface, so the engine and checkpoints
see one policy object) and keeps its own KAT threshold, fed with the step's full rollouts exactly
like KAT's buffer. After a step's rollouts, `select_training_tokens` segments each one
(`kat_diag.phases.segment` at the threshold in force for this step, tau NaN during KAT's
warm-up: then nothing fires and every token is `pre`) and turns the chosen span [lo, hi) into a
rollout whose prompt is prompt + tokens[:lo] and whose kept tokens are tokens[lo:hi]: the
trainer's loss then sees exactly those tokens, with the same context as in the full rollout.
Chosen phases must be adjacent (a contiguous span): pre, agreement, post, pre+agreement,
agreement+post, pre+agreement+post.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from kat_diag.detector import AdaptiveThreshold, KATConfig
from kat_diag.phases import Phases, segment
from kat_diag.rollout import Rollout
from kat_diag.termination import NonePolicy, StopDecision, TerminationPolicy

PHASE_NAMES = ("pre", "agreement", "post")


def parse_phases(spec: str) -> tuple[int, int]:
    """'pre+agreement' -> (first, last) phase index (0 pre, 1 agreement, 2 post), inclusive."""
    parts = [p.strip().lower() for p in spec.replace(",", "+").split("+") if p.strip()]
    bad = [p for p in parts if p not in PHASE_NAMES]
    if not parts or bad:
        raise ValueError(f"--supervise {spec!r}: phases are {' | '.join(PHASE_NAMES)} joined by '+'")
    idx = sorted({PHASE_NAMES.index(p) for p in parts})
    if idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError(f"--supervise {spec!r}: the phases must be adjacent (pre+post leaves a gap)")
    return idx[0], idx[-1]


def phase_spans(phases: Phases, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """Per rollout [lo, hi) covering phases first..last (see `parse_phases`)."""
    bounds = np.stack([np.zeros_like(phases.length), phases.pre_end, phases.agree_end, phases.length])
    return bounds[first].astype(np.int64), bounds[last + 1].astype(np.int64)


def stride_window_means(values: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Means of the non-overlapping windows (i = W-1, 2W-1, ...) of every rollout, usable ones only
    (no NaN/inf, |d| <= 1024 nats), rollout by rollout: what KAT pushes into its buffer."""
    v = np.asarray(values, dtype=np.float64)
    offs = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offs)
    n_win = lengths // window
    if n_win.sum() == 0:
        return np.zeros(0)
    bad = ~np.isfinite(v) | (np.abs(np.nan_to_num(v, nan=np.inf)) > 1024.0)
    csum = np.concatenate([[0.0], np.cumsum(np.where(bad, 0.0, v))])
    cbad = np.concatenate([[0], np.cumsum(bad)])
    rollout = np.repeat(np.arange(lengths.size), n_win)
    k = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    end = offs[:-1][rollout] + (k + 1) * window  # exclusive end of each window
    ok = cbad[end] - cbad[end - window] == 0
    return ((csum[end] - csum[end - window]) / window)[ok]


def _buffer_values(values: np.ndarray, offsets: np.ndarray, cfg: KATConfig) -> np.ndarray:
    """What KAT's threshold buffer receives from these rollouts (the detector's own rule when the
    installed detector exports it, else the stride-window means of the windows statistic)."""
    try:
        from kat_diag.detector import buffer_values  # the paper's rule (rollout minima), when present
    except ImportError:
        return stride_window_means(values, offsets, cfg.window)
    return np.asarray(buffer_values(values, offsets, cfg), dtype=np.float64)


class PhaseSupervision:
    """The `none` policy plus a KAT threshold that picks which phases of each rollout to train on."""

    def __init__(self, phases: str, kat: KATConfig, device: str | torch.device = "cpu") -> None:
        self.spec = phases
        self.first, self.last = parse_phases(phases)
        self.kat = kat
        self.inner = NonePolicy(device)
        self.name = self.inner.name
        self.threshold = AdaptiveThreshold(kat)
        self.tau = math.nan

    # -- TerminationPolicy, by delegation to `none`
    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)
        self.threshold.begin_step(step)
        self.tau = self.threshold.effective_tau

    def add_rows(self, n: int) -> None:
        self.inner.add_rows(n)

    def keep_rows(self, idx_B: torch.Tensor) -> None:
        self.inner.keep_rows(idx_B)

    def update(self, kl_BC: torch.Tensor, valid_BC: torch.Tensor | None = None) -> StopDecision:
        return self.inner.update(kl_BC, valid_BC)

    def max_new_tokens(self, default: int) -> int:
        return default

    def row_info(self) -> dict[str, torch.Tensor]:
        return self.inner.row_info()

    def end_step(self) -> dict[str, float]:
        return {**self.inner.end_step(), "tau": self.tau, "supervise_tau": self.tau}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "threshold": self.threshold.state_dict(), "spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("spec") != self.spec:
            raise ValueError(f"checkpoint supervises {state.get('spec')!r}, this run {self.spec!r}")
        self.inner.load_state_dict(state["inner"])
        self.threshold.load_state_dict(state["threshold"])

    # -- the mask
    def select(self, rollouts: list[Rollout]) -> tuple[list[Rollout], dict[str, float]]:
        """Rollouts cut down to the chosen phases, and per-phase token counts; then the step's full
        rollouts enter the threshold buffer (they count from the next step on, like KAT)."""
        if not rollouts:
            return [], {}
        kl = [r.kl.detach().cpu().double().numpy() for r in rollouts]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in kl])]).astype(np.int64)
        values = np.concatenate(kl) if offsets[-1] else np.zeros(0)
        ph = segment(values, offsets, self.kat, self.tau)
        lo, hi = phase_spans(ph, self.first, self.last)
        out = [_span(r, int(a), int(b)) for r, a, b in zip(rollouts, lo, hi, strict=True)]
        self.threshold.observe(_buffer_values(values, offsets, self.kat))
        n = float(offsets[-1])
        pre = float(ph.pre_end.sum())
        agree = float((ph.agree_end - ph.pre_end).sum())
        metrics = {"supervise_pre_share": pre / max(n, 1.0), "supervise_agreement_share": agree / max(n, 1.0),
                   "supervise_post_share": (n - pre - agree) / max(n, 1.0),
                   "supervise_trained_share": float((hi - lo).sum()) / max(n, 1.0),
                   "supervise_fired_share": float((ph.fire >= 0).mean())}
        return out, metrics


def _span(r: Rollout, lo: int, hi: int) -> Rollout:
    """The rollout seen as prompt + tokens[:lo] followed by tokens[lo:hi], all of them kept."""
    sl = slice(lo, hi)
    full = r.teacher_logprobs_full
    return dataclasses.replace(
        r, prompt_ids=torch.cat([r.prompt_ids, r.token_ids[:lo].to(r.prompt_ids.dtype)]),
        token_ids=r.token_ids[sl], student_logprob=r.student_logprob[sl], teacher_logprob=r.teacher_logprob[sl],
        kl=r.kl[sl], kl_sampled=r.kl_sampled[sl], student_entropy=r.student_entropy[sl],
        teacher_top_ids=r.teacher_top_ids[sl], teacher_top_probs=r.teacher_top_probs[sl], keep=hi - lo,
        teacher_logprobs_full=None if full is None else full[sl],
    )


def with_supervision(policy: TerminationPolicy, phases: str | None, kat: KATConfig,
                     device: str | torch.device = "cpu") -> TerminationPolicy:
    """The trainer's policy, wrapped for `--supervise PHASES` (which needs termination `none`)."""
    if not phases:
        return policy
    if policy.name != "none":
        raise ValueError(f"--supervise {phases!r} trains on phases of untruncated rollouts: it needs "
                         f"--termination none, got {policy.name!r}")
    return PhaseSupervision(phases, kat, device)


def select_training_tokens(policy: TerminationPolicy, rollouts: list[Rollout],
                           metrics: dict[str, float]) -> list[Rollout]:
    """What the loss trains on: the rollouts themselves, or their chosen phases under
    `PhaseSupervision` (whose per-phase token shares are added to `metrics`)."""
    if not isinstance(policy, PhaseSupervision):
        return rollouts
    out, extra = policy.select(rollouts)
    metrics.update(extra)
    return out
