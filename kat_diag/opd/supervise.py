"""Stage-wise supervision: train on chosen phases of untruncated rollouts (`--supervise PHASES`).

Why it exists: the paper's ablation trains on one phase only (pre-agreement, agreement or
post-agreement tokens) or on pre + agreement, to show which tokens carry the useful signal. The
same mechanism answers a question the paper leaves open: is KAT's gain from *filtering
supervision* or from *generating less*? Generate every rollout in full (termination `none`) and
train only on what KAT would have kept, `pre` = [0, onset): same supervision as KAT, none of its
savings.

How: `PhaseSupervision` wraps the `none` policy (same interface, so the engine and checkpoints
see one policy object) and keeps its own KAT threshold, fed at the end of each step with the
step's full rollouts exactly as KAT feeds its buffer (`detector.buffer_values_of`). After a
step's rollouts, `select_training_tokens` segments each one (`kat_diag.kat.phases.segment` at the
threshold in force for this step; tau is NaN during KAT's warm-up and until B_min values are in:
then nothing fires and every token is `pre`) and turns the chosen span [lo, hi) into a
rollout whose prompt is prompt + tokens[:lo] and whose kept tokens are tokens[lo:hi]: the
trainer's loss then sees exactly those tokens, with the same context as in the full rollout.
Chosen phases must be adjacent (a contiguous span): pre, agreement, post, pre+agreement,
agreement+post, pre+agreement+post.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import AdaptiveThreshold, buffer_values_of
from kat_diag.kat.phases import PHASE_NAMES, Phases, segment
from kat_diag.kat.policies import NonePolicy, StopDecision, TerminationPolicy
from kat_diag.opd.rollout import Rollout


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


class PhaseSupervision:
    """The `none` policy plus a KAT threshold that picks which phases of each rollout to train on."""

    def __init__(self, phases: str, kat: KATConfig, device: str | torch.device = "cpu",
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.spec = phases
        self.first, self.last = parse_phases(phases)
        self.kat = kat
        self.inner = NonePolicy(device)
        self.name = self.inner.name
        self.threshold = AdaptiveThreshold(kat)
        self.tau = math.nan
        self.gather = gather

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

    def end_step(self, kl_by_rollout: Sequence[Any] | None = None) -> dict[str, float]:
        """Close the step; the step's full rollouts enter the threshold buffer exactly as KAT's
        would (`buffer_values_of`, gathered over ranks): they count from the next step on."""
        if kl_by_rollout is None:
            raise ValueError("PhaseSupervision.end_step needs the step's rollouts' KL (kl_by_rollout)")
        metrics = {**self.inner.end_step(), "tau": self.tau}
        values = buffer_values_of(kl_by_rollout, self.kat)
        if self.gather is not None:
            values = self.gather(values)
        self.threshold.observe(values)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "threshold": self.threshold.state_dict(), "spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("spec") != self.spec:
            raise ValueError(f"checkpoint supervises {state.get('spec')!r}, this run {self.spec!r}")
        self.inner.load_state_dict(state["inner"])
        self.threshold.load_state_dict(state["threshold"])

    # -- the mask
    def select(self, rollouts: list[Rollout]) -> tuple[list[Rollout], dict[str, float]]:
        """Rollouts cut down to the chosen phases (at the threshold in force for this step), and the
        share of the step's tokens in each phase."""
        if not rollouts:
            return [], {}
        kl = [r.kl.detach().cpu().double().numpy() for r in rollouts]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in kl])]).astype(np.int64)
        values = np.concatenate(kl) if offsets[-1] else np.zeros(0)
        ph = segment(values, offsets, self.kat, self.tau)
        lo, hi = phase_spans(ph, self.first, self.last)
        out = [_span(r, int(a), int(b)) for r, a, b in zip(rollouts, lo, hi, strict=True)]
        n = float(offsets[-1])
        pre = float(ph.pre_end.sum())
        agree = float((ph.agree_end - ph.pre_end).sum())
        metrics = {"supervise_pre_share": pre / max(n, 1.0), "supervise_agreement_share": agree / max(n, 1.0),
                   "supervise_post_share": (n - pre - agree) / max(n, 1.0),
                   "supervise_trained_share": float((hi - lo).sum()) / max(n, 1.0),
                   "supervise_fired_share": float((ph.fire >= 0).mean())}
        return out, metrics


def _span(r: Rollout, lo: int, hi: int) -> Rollout:
    """The rollout seen as prompt + tokens[:lo] followed by tokens[lo:hi], all of them kept.

    Every per-token tensor (generated tokens, and the teacher state stored for the kept tokens,
    which under `none` are all of them) is cut to [lo, hi)."""
    n = r.gen_len
    if r.keep != n:
        raise ValueError(f"supervision needs untruncated rollouts (keep {r.keep} != length {n})")
    sliced = {f.name: getattr(r, f.name)[lo:hi] for f in dataclasses.fields(r)
              if f.name != "prompt_ids" and isinstance(getattr(r, f.name), torch.Tensor)
              and getattr(r, f.name).dim() >= 1 and getattr(r, f.name).shape[0] == n}
    prompt = torch.cat([r.prompt_ids, r.token_ids[:lo].to(r.prompt_ids.dtype)])
    return dataclasses.replace(r, prompt_ids=prompt, keep=hi - lo, **sliced)


def with_supervision(policy: TerminationPolicy, phases: str | None, kat: KATConfig,
                     device: str | torch.device = "cpu",
                     gather: Callable[[np.ndarray], np.ndarray] | None = None) -> TerminationPolicy:
    """The trainer's policy, wrapped for `--supervise PHASES` (which needs termination `none`)."""
    if not phases:
        return policy
    if policy.name != "none":
        raise ValueError(f"--supervise {phases!r} trains on phases of untruncated rollouts: it needs "
                         f"--termination none, got {policy.name!r}")
    return PhaseSupervision(phases, kat, device, gather)


def select_training_tokens(policy: TerminationPolicy, rollouts: list[Rollout],
                           metrics: dict[str, float]) -> list[Rollout]:
    """What the loss trains on: the rollouts themselves, or their chosen phases under
    `PhaseSupervision` (whose per-phase token shares are added to `metrics`)."""
    if not isinstance(policy, PhaseSupervision):
        return rollouts
    out, extra = policy.select(rollouts)
    metrics.update(extra)
    return out
