"""OPD losses on the kept tokens of student rollouts, four estimators behind one interface.

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
* `ImportanceWeightedOPD` — IW-OPD ("On the Position Bias of On-Policy Distillation", arXiv
  2606.22600; TRL's `trl.experimental.iw_opd`): the sampled-token signal with advantage
  a_t = log pi_T(y_t) - log pi_old(y_t), re-weighted per rollout by
  w_t = 1 + gamma (1 - sum_{s<t} |a_s| / max(sum_s |a_s|, eps)), so tokens after the prefix has
  accumulated its discrepancy count less. The weights are taken over the tokens the loss sees
  (under a termination policy: the kept prefix), per rollout; `LossInputs.lengths_B` marks the
  rollouts in the flat token list. Loss -log pi_theta(y_t) w_t a_t, TRL's surrogate term for term
  (its gradient equals `SampledTokenKL`'s times w_t where pi_theta = pi_old).

All return the SUM over kept tokens; the trainer divides by the number of kept tokens of the whole
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
    lengths_B: torch.Tensor | None = None  # tokens of each rollout, in order, summing to N (IW-OPD)


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


def iw_opd_weights(adv_N: torch.Tensor, lengths_B: torch.Tensor, gamma: float = 0.5,
                   eps: float = 1e-8) -> torch.Tensor:
    """IW-OPD's position weights w_t = 1 + gamma (1 - sum_{s<t} |a_s| / max(sum_s |a_s|, eps)),
    per rollout, for rollouts laid end to end in `adv_N` (`lengths_B` tokens each). Vectorised:
    one cumulative sum over the flat list minus each rollout's starting offset (in float64, so a
    long flat list does not lose the small prefix sums of a late rollout)."""
    lengths_B = lengths_B.to(adv_N.device, torch.long)
    if int(lengths_B.sum()) != adv_N.shape[0]:
        raise ValueError(f"IW-OPD: rollout lengths sum to {int(lengths_B.sum())}, not to the {adv_N.shape[0]} tokens")
    a_N = adv_N.detach().double().abs()
    seg_N = torch.repeat_interleave(torch.arange(len(lengths_B), device=a_N.device), lengths_B)
    total_B = torch.zeros(len(lengths_B), dtype=a_N.dtype, device=a_N.device).index_add_(0, seg_N, a_N)
    start_B = total_B.cumsum(0) - total_B  # |a| summed over the rollouts before each one
    prefix_N = a_N.cumsum(0) - a_N - start_B[seg_N]  # exclusive: tokens before t in its rollout
    w_N = 1.0 + gamma * (1.0 - prefix_N / total_B.clamp_min(eps)[seg_N])
    return w_N.to(adv_N.dtype)


class ImportanceWeightedOPD:
    name = "iwopd"
    teacher_state = "none"
    k = 0

    def __init__(self, gamma: float = 0.5, eps: float = 1e-8) -> None:
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
            raise ValueError(f"iw_gamma={gamma!r}: must be a number >= 0")
        if not eps > 0:
            raise ValueError(f"iw_eps={eps!r}: must be > 0")
        self.gamma, self.eps = float(gamma), float(eps)

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if x.lengths_B is None:
            raise ValueError("IW-OPD needs the rollout lengths (LossInputs.lengths_B)")
        if not bool(torch.isfinite(x.teacher_logprob_N).all()):
            raise ValueError("IW-OPD: non-finite teacher logprob of a sampled token")
        s_logp_NV = torch.log_softmax(x.student_logits_NV.float(), dim=-1)
        new_lp_N = s_logp_NV.gather(-1, x.token_ids_N[:, None]).squeeze(-1)
        adv_N = (x.teacher_logprob_N.float() - x.old_logprob_N.float()).detach()
        w_N = iw_opd_weights(adv_N, x.lengths_B, self.gamma, self.eps)
        return -(new_lp_N * (w_N * adv_N)).sum()


LOSSES: dict[str, type] = {"topk": TopKReverseKL, "full": FullReverseKL, "sampled": SampledTokenKL,
                           "iwopd": ImportanceWeightedOPD}


def make_loss(name: str, topk: int = 64, iw_gamma: float = 0.5) -> OPDLoss:
    """The estimator `name` ("topk" | "full" | "sampled" | "iwopd"); `topk` is k of "topk",
    `iw_gamma` the gamma of "iwopd" (0: the plain sampled-token signal, TRL's surrogate)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if name == "topk":
        return TopKReverseKL(topk)
    if name == "iwopd":
        return ImportanceWeightedOPD(iw_gamma)
    return LOSSES[name]()


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
