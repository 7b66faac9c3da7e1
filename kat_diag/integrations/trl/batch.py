"""TRL's generation batch seen by kat-diag: its rows as rollouts, and kat-diag's decisions put back into it.

`trl.DistillationTrainer._generate_and_score_completions` returns one dict per generation batch:
`prompt_ids` / `prompt_mask` (left-padded), `completion_ids` / `completion_mask` (right-padded; the
mask is 1 on a row's completion, EOS included, and 0 on its padding), optionally `tool_mask` (1 where
the loss counts), and `num_items_in_batch` (the loss's normaliser: tokens the loss counts, summed over
ranks). Everything here is a function of that dict and of kat-diag's own objects, so it is tested
without a trainer:

* `unpadded_rows`: each row's prompt and completion token ids, as lists;
* `posthoc_rollouts`: the termination policy run over teacher-forced per-token stats of finished
  completions (`kat_diag.opd.scoring.score_completions`), giving the same `Rollout`s the online engine
  would have returned: a stopped row ends at the policy's end (KAT: its fire), keeps `keep` tokens;
* `training_spans`: per row the span [lo, hi) the loss trains on (the kept prefix; a phase span under
  `--supervise`, whose tokens before lo stay as context);
* `apply_spans`: the spans written into TRL's masks (`completion_mask` cut at hi, `tool_mask` 0 before
  lo), columns nobody trains on trimmed, `num_items_in_batch` recomputed: TRL's loss then counts
  exactly those tokens, and a cut row's padding is never trained on whatever its pad id is;
* `problems_of`: dataset rows as `Problem`s (the world's records keep their ground truth).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kat_diag.data.problems import Problem
from kat_diag.kat.policies import TerminationPolicy
from kat_diag.opd.rollout import Rollout
from kat_diag.opd.supervise import select_training_tokens

_PROBLEM_FIELDS = ("id", "prompt", "answer", "solution", "kind")


def unpadded_rows(batch: Mapping[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of every row, padding removed (masks as TRL builds them)."""
    p_ids, p_mask = batch["prompt_ids"].cpu(), batch["prompt_mask"].cpu().bool()
    c_ids, c_mask = batch["completion_ids"].cpu(), batch["completion_mask"].cpu().bool()
    prompts = [row[m].tolist() for row, m in zip(p_ids, p_mask, strict=True)]
    completions = [row[m].tolist() for row, m in zip(c_ids, c_mask, strict=True)]
    return prompts, completions


def posthoc_rollouts(policy: TerminationPolicy, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]], scored: Sequence[Mapping[str, torch.Tensor]],
                     eos_token_ids: Sequence[int], budget: int) -> list[Rollout]:
    """Run `policy` (between its begin_step and end_step) over finished, scored completions.

    The whole batch goes through one `update` (the detector gives the same decisions for any chunking),
    with the KL masked to each row's length as the engine masks it. A row the policy stopped is cut at
    the policy's end (what online generation would have produced) and keeps the policy's `keep`; any
    other row ends with "eos" (its last token is an EOS id) or "max_len".
    """
    n = len(completions)
    policy.max_new_tokens(budget)  # a random policy reads the budget here, as in the engine
    policy.add_rows(n)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
    width = int(lengths.max()) if n else 0
    kl_BL = torch.zeros(n, width, dtype=torch.float32)
    for b, s in enumerate(scored):
        kl_BL[b, : len(s["kl"])] = s["kl"].float()
    valid_BL = torch.arange(width)[None, :] < lengths[:, None]
    if n:
        decision = policy.update(kl_BL.masked_fill(~valid_BL, 0.0), valid_BL)
        info = policy.row_info()
        stop_l, end_l, keep_l = (x.tolist() for x in (decision.stop_B, decision.end_B, decision.keep_B))
        onset_l, fire_l = info["onset"].tolist(), info["fire"].tolist()
    eos = set(int(i) for i in eos_token_ids)
    out = []
    for b in range(n):
        comp, total = completions[b], len(completions[b])
        if stop_l[b]:
            reason, length, keep = "policy", min(total, end_l[b]), keep_l[b]
        else:
            reason = "eos" if total and comp[-1] in eos else "max_len"
            length = keep = total
        keep = max(0, min(keep, length))
        stats = {k: v[:length] for k, v in scored[b].items()}
        r = Rollout(index=b, prompt_ids=torch.tensor(list(prompts[b]), dtype=torch.long),
                    token_ids=torch.tensor(comp[:length], dtype=torch.long), keep=keep, stop_reason=reason, **stats)
        r.onset, r.fire = int(onset_l[b]), int(fire_l[b])
        out.append(r)
    return out


def training_spans(policy: TerminationPolicy, rollouts: list[Rollout],
                   metrics: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rollout the span [lo, hi) of its tokens the loss trains on: [0, keep) in general, the chosen
    phases under `--supervise` (`kat_diag.opd.supervise`, which adds its phase shares to `metrics`)."""
    chosen = select_training_tokens(policy, rollouts, metrics)
    lo = [len(c.prompt_ids) - len(r.prompt_ids) for r, c in zip(rollouts, chosen, strict=True)]
    hi = [a + c.keep for a, c in zip(lo, chosen, strict=True)]
    return torch.tensor(lo, dtype=torch.long), torch.tensor(hi, dtype=torch.long)


def apply_spans(batch: dict[str, Any], lo_B: torch.Tensor, hi_B: torch.Tensor,
                global_sum: Callable[[torch.Tensor], torch.Tensor], pad_to_multiple_of: int | None = None) -> None:
    """Train on completion tokens [lo_b, hi_b) of row b only (in place), see the module docstring.

    Tokens before lo stay visible to attention (`tool_mask` only gates the loss); tokens from hi on are
    masked out of both. `global_sum` sums a scalar tensor over ranks (`accelerator.gather(x).sum()`).
    """
    mask_BL = batch["completion_mask"]
    device = mask_BL.device
    B, L = mask_BL.shape
    lo_B, hi_B = lo_B.to(device), hi_B.to(device)
    if (lo_B < 0).any() or (hi_B < lo_B).any():
        raise ValueError("training spans must satisfy 0 <= lo <= hi")
    if B and int(hi_B.max()) > L:
        raise ValueError(f"a training span ends at {int(hi_B.max())}, beyond the batch's {L} completion columns")
    pos_1L = torch.arange(L, device=device)[None, :]
    batch["completion_mask"] = mask_BL * (pos_1L < hi_B[:, None]).to(mask_BL.dtype)
    if bool((lo_B > 0).any()):
        from_lo = (pos_1L >= lo_B[:, None]).to(mask_BL.dtype)
        batch["tool_mask"] = from_lo if "tool_mask" not in batch else batch["tool_mask"] * from_lo
    # Columns past every row's span carry nothing to train on: drop them (the loss's forward is shorter).
    width = max(1, int(hi_B.max()) if B else 1)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    width = min(width, L)
    for key in ("completion_ids", "completion_mask", "tool_mask"):
        if key in batch:
            batch[key] = batch[key][:, :width]
    loss_mask = batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]
    batch["num_items_in_batch"] = global_sum(loss_mask.sum())


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


def problems_of(inputs: Sequence[Mapping[str, Any]]) -> tuple[list[Problem], list[bool]]:
    """Each dataset row as a `Problem`, and whether it has a reference answer to grade against.

    Fields used when present: id (else prompt_id, else a hash of the prompt, stable across epochs),
    prompt, answer, solution, kind ("math" when absent: math-verify; the world's records say "arith").
    A record of the world's own format keeps its solution, so its rollouts get ground truth.
    """
    problems, graded = [], []
    for x in inputs:
        text = _prompt_text(x["prompt"])
        pid = x.get("id", x.get("prompt_id"))
        if pid is None:
            pid = "sha1-" + hashlib.sha1(text.encode()).hexdigest()[:12]
        answer = x.get("answer")
        problems.append(Problem(id=str(pid), prompt=text, answer="" if answer is None else str(answer),
                                solution=str(x.get("solution") or ""), kind=str(x.get("kind") or "math")))
        graded.append(answer is not None)
    return problems, graded
