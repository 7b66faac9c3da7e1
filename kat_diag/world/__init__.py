"""The embedded world: a tiny teacher and student, their task, data and ground truth, built from a seed.

Nothing can be downloaded here, so kat-diag ships its own model organism with a planted agreement
trap (repetition loops the teacher follows). Modules: `tasks` (the arithmetic chains and the loop
documents), `tokenizer` (a character tokenizer saved as a Hugging Face fast tokenizer), `sft` (the
SFT of both models), `build` (`WorldConfig`, `build_world`), `paths` (where a world lives on disk;
no torch), `truth` (per rollout: first wrong line, loop start, verdict), `loop_probe` (how readily a
model starts a loop).

May import: `kat_diag.data`, `kat_diag.models`, `kat_diag.run`. Nothing in the trainer depends on
the world except as a data source (`paths`) and for ground truth (`truth`).
"""

from __future__ import annotations

from typing import Any

# Names that lived in the flat module `kat_diag.world` before the layout (0.1); kept importable.
_OLD_NAMES = {"DEFAULT_WORLD_DIR": "paths", "load_world_splits": "paths", "world_paths": "paths",
              "WorldConfig": "build", "ModelSpec": "build", "build_world": "build"}


def __getattr__(name: str) -> Any:
    if name in _OLD_NAMES:
        import importlib
        import warnings

        new = f"kat_diag.world.{_OLD_NAMES[name]}"
        warnings.warn(f"kat_diag.world.{name} moved to {new}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)
    raise AttributeError(f"module 'kat_diag.world' has no attribute {name!r}")
