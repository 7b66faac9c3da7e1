"""OPD losses on the kept tokens of student rollouts, three estimators behind one interface.

* `FullReverseKL` — the full-vocabulary reverse KL sum_v pi_s(v) (log pi_s(v) - log pi_T(v)),
  differentiated through pi_s (GKD with beta = 1 on on-policy samples). Needs the teacher's full
  log-probs at each kept position, which the rollout engine keeps from online scoring (memory:
  kept tokens x vocabulary).
* `TopKReverseKL` — the paper's loss: reverse KL over the student's top-k tokens (chosen when the
  token was sampled) plus one tail bucket per model holding the remaining probability mass,
  sum_{v in top-k} p_s(v) log(p_s(v)/p_T(v)) + p_s(tail) log(p_s(tail)/p_T(tail)). The teacher's
  kept state is tokens x (k + 1) (its log-probs at the k ids and its tail log-mass), not tokens x
  vocabulary, so it scales to a 150k vocabulary. With k >= V there is no tail and it equals
  `FullReverseKL` (value and gradient).
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
    topk_ids_NK: torch.Tensor | None = None  # the student's top-k ids at sampling time (TopKReverseKL)
    teacher_topk_logprobs_NK: torch.Tensor | None = None  # teacher log-probs at those ids
    teacher_tail_logprob_N: torch.Tensor | None = None  # teacher log-mass outside them (-inf: none)


def p_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """exp(logp) (logp - logq) elementwise, with 0 where p = 0 (logp = -inf, e.g. masked logits).

    The plain product is 0 x -inf = NaN there, in value and (through the unselected branch of a
    `where`) in gradient; both branches are therefore made finite before the product. Where p > 0
    and q = 0 the term stays +inf: an infinite reverse KL is the true value (the trainer refuses it).
    """
    has_p = logp > float("-inf")
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp_safe = torch.where(has_p, logp, zero)
    logq_safe = torch.where(has_p, logq.to(logp.dtype), zero)
    return torch.where(has_p, logp_safe.exp() * (logp_safe - logq_safe), zero)


class OPDLoss(Protocol):
    name: str
    teacher_state: str  # what the rollout engine keeps of the teacher: "none" | "full" | "topk"
    k: int  # top-k size for teacher_state "topk"

    def __call__(self, x: LossInputs) -> torch.Tensor: ...


class FullReverseKL:
    name = "full"
    teacher_state = "full"
    k = 0

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if x.teacher_logprobs_NV is None:
            raise ValueError("full reverse KL needs the teacher's full log-probs")
        s_logp_NV = torch.log_softmax(x.student_logits_NV.float(), dim=-1)
        kl_N = p_log_ratio(s_logp_NV, x.teacher_logprobs_NV.float()).sum(-1)
        return kl_N.sum()


class TopKReverseKL:
    name = "topk"
    teacher_state = "topk"

    def __init__(self, k: int = 64) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"topk={k!r}: must be an integer >= 1")
        self.k = k

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if x.topk_ids_NK is None or x.teacher_topk_logprobs_NK is None or x.teacher_tail_logprob_N is None:
            raise ValueError("top-k reverse KL needs the top-k ids and the teacher's top-k and tail log-probs")
        s_logp_NV = torch.log_softmax(x.student_logits_NV.float(), dim=-1)
        ids_NK = x.topk_ids_NK.long()
        s_top_NK = s_logp_NV.gather(-1, ids_NK)
        t_top_NK = x.teacher_topk_logprobs_NK.float()
        kl_N = p_log_ratio(s_top_NK, t_top_NK).sum(-1)
        if ids_NK.shape[-1] < s_logp_NV.shape[-1]:  # k < V: one tail bucket per model
            outside_NV = s_logp_NV.scatter(-1, ids_NK, float("-inf"))
            # No student mass outside the top-k (masked logits): the tail is exactly 0. logsumexp
            # of a row of -inf has a NaN gradient, so such rows are summed over zeros and reset.
            empty_N1 = torch.isneginf(outside_NV).all(-1, keepdim=True)
            s_tail_N = torch.logsumexp(outside_NV.masked_fill(empty_N1, 0.0), dim=-1)
            s_tail_N = s_tail_N.masked_fill(empty_N1.squeeze(-1), float("-inf"))
            kl_N = kl_N + p_log_ratio(s_tail_N, x.teacher_tail_logprob_N.float())
        return kl_N.sum()


class SampledTokenKL:
    name = "sampled"
    teacher_state = "none"
    k = 0

    def __call__(self, x: LossInputs) -> torch.Tensor:
        s_logp_NV = torch.log_softmax(x.student_logits_NV.float(), dim=-1)
        new_lp_N = s_logp_NV.gather(-1, x.token_ids_N[:, None]).squeeze(-1)
        adv_N = (x.teacher_logprob_N - x.old_logprob_N).detach()
        ratio_N = torch.exp(new_lp_N - x.old_logprob_N.detach())
        return -(ratio_N * adv_N).sum()


LOSSES: dict[str, type] = {"topk": TopKReverseKL, "full": FullReverseKL, "sampled": SampledTokenKL}


def make_loss(name: str, topk: int = 64) -> OPDLoss:
    """The estimator `name` ("topk" | "full" | "sampled"); `topk` is k of "topk"."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return TopKReverseKL(topk) if name == "topk" else LOSSES[name]()


def topk_teacher_state(s_logp_BCV: torch.Tensor, t_logp_BCV: torch.Tensor, k: int
                       ) -> dict[str, torch.Tensor]:
    """What the rollout engine keeps for `TopKReverseKL`: the student's top-k ids (k capped at V),
    the teacher's log-probs there and its log-mass outside them (-inf when k >= V)."""
    k = min(k, s_logp_BCV.shape[-1])
    ids = s_logp_BCV.topk(k, dim=-1).indices
    t_top = t_logp_BCV.gather(-1, ids)
    if k < t_logp_BCV.shape[-1]:
        t_tail = torch.logsumexp(t_logp_BCV.scatter(-1, ids, float("-inf")), dim=-1)
    else:
        t_tail = torch.full(t_logp_BCV.shape[:-1], float("-inf"), device=t_logp_BCV.device)
    return {"topk_ids": ids.to(torch.int32), "teacher_topk_logprobs": t_top, "teacher_tail_logprob": t_tail}
