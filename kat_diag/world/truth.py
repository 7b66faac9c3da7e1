"""Ground truth of an embedded-world rollout: where it first goes wrong, whether it loops, and how.

The embedded world knows the reference solution of every problem, so it can say for each student
rollout exactly where the agreement trap begins — which real data cannot. KAT's onsets are scored
against these: a cut at or after the first error cuts degenerate agreement, a cut before it (or
in a right rollout) cuts useful tokens. The trace store keeps them per rollout (`traces`).

Positions are token indices into the generated tokens; in the world's character tokenizer one
token is one character, and `token_starts` maps characters to tokens for any tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kat_diag.data.grading import ANSWER_MARKER, check_answer
from kat_diag.data.problems import Problem

# verdict values (None for rollouts on real data)
RIGHT, WRONG, LOOP, UNFINISHED = "right", "wrong", "loop", "unfinished"


@dataclass(frozen=True)
class Truth:
    first_error: int  # token index of the start of the first line that leaves the reference solution; -1 none
    loop_start: int  # token index of the start of the first line equal to the line before it; -1 none
    verdict: str  # right | wrong (wrong answer, no loop) | loop (a repetition loop) | unfinished


def first_departure(text: str, reference: str) -> int:
    """Character index of the first character of `text` that differs from `reference`; -1 when
    `text` is a prefix of it (right so far). The first departure from the reference is also the
    first step that does not follow from the lines before it: up to there they are the reference."""
    n = min(len(text), len(reference))
    for i in range(n):
        if text[i] != reference[i]:
            return i
    return len(reference) if len(text) > len(reference) else -1


def first_wrong_line(text: str, reference: str) -> int:
    """Character index of the start of the first line of `text` that is not the reference's line
    (the line holding the first departure); -1 when `text` is a prefix of the reference. A wrong
    step is a line: "30-5=26" is wrong from its first character on, though only its last differs,
    and a repeated line is the first error wherever its characters happen to match the next one."""
    i = first_departure(text, reference)
    return -1 if i < 0 else text.rfind("\n", 0, i) + 1


def loop_start(text: str) -> int:
    """Character index where the first complete line equal to the previous complete line starts."""
    lines = text.split("\n")
    pos = 0
    for i in range(1, len(lines) - 1):  # the last piece may be cut by the budget: not a complete line
        pos += len(lines[i - 1]) + 1
        if lines[i] and lines[i] == lines[i - 1]:
            return pos
    return -1


def rollout_truth(problem: Problem, text: str, token_starts: Sequence[int] | None = None) -> Truth | None:
    """Ground truth of one rollout's decoded `text` (special tokens removed); None for real data.

    token_starts: character offset of each generated token in `text` (None: one token per character).
    """
    if problem.kind != "arith" or not problem.solution:
        return None
    err, loop = first_wrong_line(text, problem.solution), loop_start(text)
    if check_answer(problem, text):
        verdict = RIGHT
    elif loop >= 0:
        verdict = LOOP
    elif ANSWER_MARKER in text:
        verdict = WRONG
    else:
        verdict = UNFINISHED
    if token_starts is not None:
        err, loop = _to_token(err, token_starts), _to_token(loop, token_starts)
    return Truth(err, loop, verdict)


def _to_token(char_index: int, token_starts: Sequence[int]) -> int:
    if char_index < 0:
        return -1
    import bisect

    return max(0, bisect.bisect_right(list(token_starts), char_index) - 1)


def token_starts_of(token_texts: Sequence[str]) -> list[int]:
    """Character offset of each token in the concatenated decoded text."""
    out, pos = [], 0
    for t in token_texts:
        out.append(pos)
        pos += len(t)
    return out


def truth_columns(problems: Sequence[Problem], texts: Sequence[str],
                  token_texts: Sequence[Sequence[str]]) -> dict[str, list]:
    """The trace store's ground-truth columns for one batch (None where there is none: real data)."""
    truths = [rollout_truth(p, t, token_starts_of(tt)) for p, t, tt in zip(problems, texts, token_texts, strict=True)]
    return {"first_error": [None if t is None else t.first_error for t in truths],
            "loop_start": [None if t is None else t.loop_start for t in truths],
            "verdict": [None if t is None else t.verdict for t in truths]}
