"""Answer checking: exact match of the marked answer in the world, math-verify on real data."""

from __future__ import annotations

import re

from kat_diag.data.problems import Problem

ANSWER_MARKER = "#"


# ---------------------------------------------------------------------------------------------
# Real math data sets from local files
# ---------------------------------------------------------------------------------------------

_GSM8K_RE = re.compile(r"####\s*(.+?)\s*$", re.S)


def extract_gsm8k_answer(text: str) -> str | None:
    """`... #### 1,234` -> `1234`."""
    m = _GSM8K_RE.search(text)
    return m.group(1).replace(",", "").strip() if m else None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = start = starts[-1]
    depth = 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


# ---------------------------------------------------------------------------------------------
# Answer checking
# ---------------------------------------------------------------------------------------------

_MARKER_RE = re.compile(re.escape(ANSWER_MARKER) + r"\s*(-?\d+)")


def extract_arith_answer(completion: str) -> str | None:
    """The integer after the first answer marker, or None."""
    m = _MARKER_RE.search(completion)
    return m.group(1) if m else None


def check_arith(completion: str, answer: str) -> bool:
    """Exact match of the marked final answer."""
    got = extract_arith_answer(completion)
    return got is not None and int(got) == int(answer)


def check_math(completion: str, answer: str) -> bool:
    """math-verify: parse the completion's final answer and the gold one, compare symbolically."""
    from math_verify import parse, verify

    gold = parse("$" + answer + "$") or parse(answer)
    boxed = extract_boxed(completion)
    gsm = extract_gsm8k_answer(completion)
    candidate_text = f"${boxed}$" if boxed is not None else (f"${gsm}$" if gsm is not None else completion)
    pred = parse(candidate_text)
    if not gold or not pred:
        return False
    try:
        return bool(verify(gold, pred))
    except Exception:  # math-verify raises on exotic expressions; such an answer is not verified
        return False


def check_answer(problem: Problem, completion: str) -> bool:
    """Grade a completion: exact match in the arithmetic world, math-verify on real data."""
    if problem.kind == "arith":
        return check_arith(completion, problem.answer)
    return check_math(completion, problem.answer)
