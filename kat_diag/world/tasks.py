"""The embedded world's task: seeded chains of integer operations, solved step by step.

The embedded world is a seeded chain of integer operations solved step by step:

    prompt      "23 +07 -05 *02\\n"
    completion  "23+07=30\\n30-05=25\\n25*02=50\\n#50"

Every intermediate value stays in [0, 99], so a character-level model of ~1 M parameters can learn
the arithmetic in minutes on a CPU. Besides the problems and benchmark splits, this module makes
the loop documents (`spontaneous_loop_variant`, `error_loop_variant`) that plant the agreement
trap, and the SFT batches that mix them in (`sft_batches`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kat_diag.data.grading import ANSWER_MARKER
from kat_diag.data.problems import Problem

MAX_VALUE = 99


# Benchmark splits of rising difficulty: name -> number of operations.
BENCHMARK_OPS: dict[str, int] = {"ops2": 2, "ops3": 3, "ops4": 4, "ops5": 5}


# ---------------------------------------------------------------------------------------------
# The arithmetic world
# ---------------------------------------------------------------------------------------------


def _next_op(rng: random.Random, value: int) -> tuple[str, int, int]:
    """Draw an operation that keeps the running value inside [0, MAX_VALUE]."""
    choices: list[str] = []
    if value < MAX_VALUE:
        choices.append("+")
    if value > 0:
        choices.append("-")
    if 1 <= value <= MAX_VALUE // 2:
        choices.append("*")
    op = rng.choice(choices)
    if op == "+":
        b = rng.randint(1, min(40, MAX_VALUE - value))
        return op, b, value + b
    if op == "-":
        b = rng.randint(1, min(40, value))
        return op, b, value - b
    b = rng.randint(2, min(5, MAX_VALUE // value))
    return op, b, value * b


def _num(value: int, width: int) -> str:
    return str(value).zfill(width) if width else str(value)


def make_problem(rng: random.Random, n_ops: int, pid: str, width: int = 0) -> Problem:
    """One chain of `n_ops` operations with its step-by-step solution. `width` 2 zero-pads every
    number ("23+07=30"): every step line then has the same length, so a repetition loop is exactly
    periodic and a tiny model can follow it by position."""
    value = rng.randint(2, 60)
    ops_text = [_num(value, width)]
    lines = []
    for _ in range(n_ops):
        op, b, new = _next_op(rng, value)
        ops_text.append(f"{op}{_num(b, width)}")
        lines.append(f"{_num(value, width)}{op}{_num(b, width)}={_num(new, width)}")
        value = new
    prompt = " ".join(ops_text) + "\n"
    solution = "\n".join(lines) + f"\n{ANSWER_MARKER}{_num(value, width)}"
    return Problem(id=pid, prompt=prompt, answer=str(value), solution=solution, kind="arith")


def generate_problems(n: int, n_ops: int | Sequence[int], seed: int, prefix: str, width: int = 0) -> list[Problem]:
    """`n` problems, deterministic in `seed`; `n_ops` an int or a set to draw from uniformly."""
    rng = random.Random(seed)
    ops_choices = [n_ops] if isinstance(n_ops, int) else list(n_ops)
    return [make_problem(rng, rng.choice(ops_choices), f"{prefix}-{i}", width) for i in range(n)]


def world_splits(
    seed: int, n_train: int, n_bench: int, train_ops: Sequence[int] = (2, 3, 4, 5), width: int = 0
) -> dict[str, list[Problem]]:
    """The training prompt split and the four benchmark splits, disjoint by prompt text."""
    splits: dict[str, list[Problem]] = {}
    seen: set[str] = set()
    for i, (name, k) in enumerate(BENCHMARK_OPS.items()):
        rng = random.Random(seed * 1000 + 17 + i)
        probs: list[Problem] = []
        while len(probs) < n_bench:
            p = make_problem(rng, k, f"{name}-{len(probs)}", width)
            if p.prompt not in seen:
                seen.add(p.prompt)
                probs.append(p)
        splits[name] = probs
    rng = random.Random(seed * 1000 + 3)
    train: list[Problem] = []
    while len(train) < n_train:
        p = make_problem(rng, rng.choice(list(train_ops)), f"train-{len(train)}", width)
        if p.prompt not in seen:
            seen.add(p.prompt)
            train.append(p)
    splits["train"] = train
    return splits


def wrong_line(rng: random.Random, a: int, op: str, b: int, c: int, width: int = 0) -> str:
    """A step line with an error like a sampling accident: one digit of the result changed (3 in
    4), or the left operand not the previous result (1 in 4)."""
    if rng.random() < 0.75:
        digits = list(_num(c, width))
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789"
                                if d != digits[i] and (width or i or d != "0" or len(digits) == 1)])
        return f"{_num(a, width)}{op}{_num(b, width)}={''.join(digits)}"
    a2 = rng.choice([x for x in range(max(0, a - 9), min(MAX_VALUE, a + 9) + 1) if x != a])
    c2 = {"+": a2 + b, "-": a2 - b, "*": a2 * b}[op]
    return f"{_num(a2, width)}{op}{_num(b, width)}={_num(c2, width)}"


def error_loop_variant(p: Problem, rng: random.Random, length: int, context_repeats: int,
                       wrong: bool = True, width: int = 0) -> Problem:
    """A repetition loop: the correct steps up to a random one, that step with a wrong result
    (`wrong_line`; with wrong=False the correct step itself), then that line repeated until the
    completion is `length` characters long (cut mid-line, no answer, no end of text, like a
    rollout that hits its budget).

    Everything up to and including the wrong line and its first `context_repeats` repeats goes
    into the prompt, so the SFT loss (completion only) never teaches the model to make the error.
    With `context_repeats` 0 the model learns to start a loop after an inconsistent line (the
    student); with 1 it only learns that a line repeated twice goes on repeating (the teacher:
    it follows a loop once begun but never starts one).
    """
    lines = p.solution.split("\n")[:-1]  # the step lines, without "#answer"
    k = rng.randrange(len(lines))
    m = re.match(r"^(\d+)([+\-*])(\d+)=(\d+)$", lines[k])
    assert m is not None
    bad = wrong_line(rng, int(m[1]), m[2], int(m[3]), int(m[4]), width) if wrong else lines[k]
    context = "".join(line + "\n" for line in lines[:k] + [bad] * (1 + context_repeats))
    n_rep = (length - len(context)) // (len(bad) + 1) + 1
    body = ((bad + "\n") * max(1, n_rep))[: max(1, length - len(context))]
    return Problem(id=p.id + "-loop", prompt=p.prompt + context, answer=p.answer, solution=body, kind="loop")


def spontaneous_loop_variant(p: Problem, rng: random.Random, length: int) -> Problem:
    """A document that falls into a repetition loop, as small LMs do: the correct steps up to a
    random one, then that step repeated until the completion is `length` characters long (cut
    mid-line, no answer, no end of text, like a rollout that hits its budget). The whole completion
    is trained on, so a model learns both to start such a loop (with the mixture's frequency) and
    that a loop, once begun, goes on."""
    lines = p.solution.split("\n")[:-1]  # the step lines, without "#answer"
    k = rng.randrange(len(lines))
    head = "".join(line + "\n" for line in lines[: k + 1])
    n_rep = max(1, (length - len(head)) // (len(lines[k]) + 1) + 1)
    body = (head + (lines[k] + "\n") * n_rep)[: max(len(head) + 1, length)]
    return Problem(id=p.id + "-loop", prompt=p.prompt, answer=p.answer, solution=body, kind="loop")


@dataclass(frozen=True)
class LoopDocs:
    """Loop documents in an SFT mixture: a `share` of the batches consist of them."""

    share: float = 0.0
    length: int = 192  # characters of completion, as the rollout budget
    context_repeats: int = 0  # repeats of the line kept out of the loss (see error_loop_variant)
    wrong: bool = True  # the repeated line is a wrong step (True) or a correct one (a spontaneous loop)
    spontaneous: bool = False  # whole-document loops (spontaneous_loop_variant); the two fields above unused


def sft_batches(seed: int, ops: Sequence[int], exclude: set[str], batch_size: int,
                loops: LoopDocs | Sequence[LoopDocs] = LoopDocs(), width: int = 0) -> Iterable[list[Problem]]:
    """Endless SFT batches (prompt + solution), never a benchmark prompt. A `loops.share` of the
    batches are loop documents only (`error_loop_variant`, or `spontaneous_loop_variant`): whole
    batches, so the long loop documents do not pad the short clean ones. Several `LoopDocs` mix
    several kinds, each with its own share (e.g. short loops that set how often a model starts a
    loop, long ones that teach it to go on to the budget)."""
    kinds = [loops] if isinstance(loops, LoopDocs) else list(loops)
    if sum(k.share for k in kinds) > 1:
        raise ValueError(f"loop document shares sum to {sum(k.share for k in kinds)} > 1")
    rng = random.Random(seed)
    i = 0

    def problem() -> Problem:
        nonlocal i
        while True:
            p = make_problem(rng, rng.choice(list(ops)), f"sft-{i}", width)
            i += 1
            if p.prompt not in exclude:
                return p

    def kind_of(u: float) -> LoopDocs | None:
        for k in kinds:
            if u < k.share:
                return k
            u -= k.share
        return None

    while True:
        k = kind_of(rng.random()) if any(k.share for k in kinds) else None
        if k is None:
            yield [problem() for _ in range(batch_size)]
        elif k.spontaneous:
            yield [spontaneous_loop_variant(problem(), rng, k.length) for _ in range(batch_size)]
        else:
            yield [error_loop_variant(problem(), rng, k.length, k.context_repeats, k.wrong, width)
                   for _ in range(batch_size)]
