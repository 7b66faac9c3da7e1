"""Where the embedded world lives on disk, without importing torch (the CLI's defaults need it).

A world directory is laid out like real checkpoints: `teacher/`, `student/`, `tokenizer/`, `data/`
(one JSONL file per split) and `world.json`. `DEFAULT_WORLD_DIR` is the committed one.
"""

from __future__ import annotations

from pathlib import Path

from kat_diag.data.problems import Problem, read_problems
from kat_diag.world.tasks import BENCHMARK_OPS

DEFAULT_WORLD_DIR = Path(__file__).resolve().parents[2] / "data" / "world"


def world_dir_of(student: str | Path) -> Path:
    """Where `data=world` prompts come from: the student's world when it sits in one (a world built
    with `world build --out DIR`), else the committed world."""
    parent = Path(student).parent
    return parent if (parent / "data").exists() else DEFAULT_WORLD_DIR


def world_split_names(student: str | Path) -> list[str]:
    d = world_dir_of(student) / "data"
    if not d.is_dir():
        raise FileNotFoundError(f"--data world: no world data at {d}; run `kat-diag world build --out DIR` first")
    return sorted(p.stem for p in d.glob("*.jsonl"))


def load_world_splits(world_dir: str | Path = DEFAULT_WORLD_DIR) -> dict[str, list[Problem]]:
    """The world's data splits: "train" and the benchmark splits, in difficulty order."""
    d = Path(world_dir) / "data"
    if not d.exists():
        raise FileNotFoundError(f"no world data at {d}; run `kat-diag world build` first")
    return {name: read_problems(d / f"{name}.jsonl") for name in ("train", *BENCHMARK_OPS)}


def world_paths(world_dir: str | Path = DEFAULT_WORLD_DIR) -> dict[str, Path]:
    w = Path(world_dir)
    return {name: w / name for name in ("teacher", "student", "tokenizer", "data")}
