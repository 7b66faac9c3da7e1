"""OPD losses on the kept tokens of student rollouts, two estimators behind one interface.

* `FullReverseKL` — the full-vocabulary reverse KL sum_v pi_s(v) (log pi_s(v) - log pi_T(v)),
  differentiated through pi_s (GKD with beta = 1 on on-policy samples). Needs the teacher's full
  log-probs at each kept position, which the rollout engine keeps from online scoring (memory:
  kept tokens x vocabulary).
* `SampledTokenKL` — the sampled-token form used by tinker-cookbook: advantage
  A_t = log pi_T(y_t) - log pi_old(y_t) (minus the per-token reverse-KL estimate), importance
  sampled policy gradient -ratio_t * A_t with ratio_t = pi_theta(y_t) / pi_old(y_t). Needs only the
  teacher logprob of the sampled token.

Both return the SUM over kept tokens; the trainer divides by the number of kept tokens of the whole
step (over micro-batches and ranks), so the gradient does not depend on how the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class LossInputs:
    """Kept tokens of a micro-batch, flattened to N tokens."""

    student_logits_NV: torch.Tensor  # with grad
    token_ids_N: torch.Tensor
    old_logprob_N: torch.Tensor  # student logprob at sampling time
    teacher_logprob_N: torch.Tensor  # teacher logprob of the sampled token
    teacher_logprobs_NV: torch.Tensor | None = None  # full teacher log-probs (FullReverseKL)


class OPDLoss(Protocol):
    name: str
    needs_full_teacher: bool

    def __call__(self, x: LossInputs) -> torch.Tensor: ...


class FullReverseKL:
    name = "full"
    needs_full_teacher = True

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if x.teacher_logprobs_NV is None:
            raise ValueError("full reverse KL needs the teacher's full log-probs")
        s_logp_NV = torch.log_softmax(x.student_logits_NV.float(), dim=-1)
        kl_N = (s_logp_NV.exp() * (s_logp_NV - x.teacher_logprobs_NV.float())).sum(-1)
        return kl_N.sum()


class SampledTokenKL:
    name = "sampled"
    needs_full_teacher = False

    def __call__(self, x: LossInputs) -> torch.Tensor:
        s_logp_NV = torch.log_softmax(x.student_logits_NV.float(), dim=-1)
        new_lp_N = s_logp_NV.gather(-1, x.token_ids_N[:, None]).squeeze(-1)
        adv_N = (x.teacher_logprob_N - x.old_logprob_N).detach()
        ratio_N = torch.exp(new_lp_N - x.old_logprob_N.detach())
        return -(ratio_N * adv_N).sum()


LOSSES: dict[str, type] = {"full": FullReverseKL, "sampled": SampledTokenKL}


def make_loss(name: str) -> OPDLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]()
