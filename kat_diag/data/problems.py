"""Problems: the one record every data source becomes (prompt, reference answer, solution, kind)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt the model sees, the reference answer and (optionally) a solution."""

    id: str
    prompt: str
    answer: str
    solution: str = ""
    kind: str = "arith"  # "arith" -> exact match; "math" -> math-verify

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> Problem:
        return Problem(**d)


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.to_json()) + "\n")


def read_problems(path: str | Path) -> list[Problem]:
    """Read problems written by `write_jsonl` (the world's own format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"problem file not found: {path}")
    out = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(Problem.from_json(json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a kat-diag problem record ({e})") from e
    if not out:
        raise ValueError(f"{path}: no problems in file")
    return out


def is_problem_record(record: dict) -> bool:
    """A record of the world's own format (`write_jsonl`), read as a `Problem` with its ground truth."""
    return set(record) == {"id", "prompt", "answer", "solution", "kind"}
