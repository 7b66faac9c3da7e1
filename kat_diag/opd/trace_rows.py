"""Rollouts as rows of the trace store: the one place that turns `Rollout`s into `TraceWriter` columns.

The trainer, `record`, `score` (completions of another trainer, scored after the fact) and the TRL
integration all write the same store, so they all build their rows here: per-rollout scalars
(step, rollout id, prompt id, policy, tau, onset, fire, stop reason, lengths, text, correctness),
the per-token arrays of `kat_diag.opd.rollout.token_stats`, the decoded token strings, and the
world's ground truth (`kat_diag.world.truth`; null columns on real data).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kat_diag.data.problems import Problem
from kat_diag.opd.rollout import Rollout
from kat_diag.traces.schema import make_rollout_id
from kat_diag.world.truth import truth_columns


def trace_batch(rollouts: list[Rollout], problems: list[Problem], texts: list[str], tokenizer, step: int,
                rank: int, policy_name: str, tau: float, correct: list[bool]) -> dict[str, Any]:
    """Columns of the trace store for one step's rollouts (format of `traces.TraceWriter.append`)."""
    def np_list(attr: str) -> list[np.ndarray]:
        return [getattr(r, attr).cpu().numpy() for r in rollouts]

    token_text = [tokenizer.batch_decode([[t] for t in r.token_ids.tolist()]) for r in rollouts]
    return {
        "step": step,
        "rollout_id": [make_rollout_id(step, rank, r.index) for r in rollouts],
        "prompt_id": [p.id for p in problems],
        "policy": policy_name,
        "tau": tau,
        "onset": [r.onset for r in rollouts],
        "fire": [r.fire for r in rollouts],
        "stop_reason": [r.stop_reason for r in rollouts],
        "gen_len": [r.gen_len for r in rollouts],
        "kept_len": [r.keep for r in rollouts],
        "text": texts,
        "correct": correct,
        "token_ids": [a.astype(np.int32) for a in np_list("token_ids")],
        "student_logprob": np_list("student_logprob"),
        "teacher_logprob": np_list("teacher_logprob"),
        "kl": np_list("kl"),
        "kl_sampled": np_list("kl_sampled"),
        "student_entropy": np_list("student_entropy"),
        "teacher_top_ids": [a.astype(np.int32) for a in np_list("teacher_top_ids")],
        "teacher_top_probs": np_list("teacher_top_probs"),
        "token_text": token_text,
        **truth_columns(problems, texts, token_text),  # ground truth (embedded world only)
    }
