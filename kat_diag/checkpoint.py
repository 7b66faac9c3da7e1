"""Trainer state on disk without arbitrary unpickling.

`--resume` reads `checkpoints/step-N/trainer_state.pt` (optimizer, scheduler, termination policy,
RNG state, step). Researchers share run directories, and `torch.load(weights_only=False)` would run
any code a crafted pickle names. The state is therefore written as plain containers of tensors and
Python scalars and read back with `torch.load(weights_only=True)`, whose unpickler builds only
tensors, dicts, lists, tuples, strings and numbers: a file naming any other callable is refused with
a one-line error before anything in it runs. numpy values a policy may hold are stored as tensors
(and numpy scalars as Python numbers) so no numpy type needs to be allowlisted.

A checkpoint that this loader refuses but that you wrote yourself with an older kat-diag can be
converted once, explicitly trusting it:
`python -m kat_diag.checkpoint convert RUN/checkpoints/step-N/trainer_state.pt --trust`.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A trainer state that cannot be loaded safely (one-line message naming the file)."""


def to_plain(obj: Any) -> Any:
    """Containers of tensors and Python scalars only (what the weights-only unpickler accepts)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    torch.save(to_plain(state), path)


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state at `path`, unpickled with `weights_only=True`; CheckpointError otherwise."""
    p = Path(path)
    try:
        state = torch.load(p, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint state {p} does not exist") from e
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        reason = _reason(e)
        raise CheckpointError(
            f"refusing to load {p}: it is not a plain trainer state ({reason}); loading it could run code. "
            f"If you wrote it yourself with an older kat-diag and trust it: "
            f"python -m kat_diag.checkpoint convert {p} --trust"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{p}: not a kat-diag trainer state (no 'step')")
    return state


def _reason(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip().rstrip(".")[:200]
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def convert(path: str | Path) -> None:
    """Rewrite a trusted old trainer state as a plain one, in place (keeps a .bak copy)."""
    p = Path(path)
    state = torch.load(p, weights_only=False)  # the caller vouched for this file (--trust)
    p.with_suffix(p.suffix + ".bak").write_bytes(p.read_bytes())
    save_state(p, state)
    load_state(p)  # proves the result loads safely


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "convert" or args[2] != "--trust":
        print("usage: python -m kat_diag.checkpoint convert PATH/trainer_state.pt --trust\n"
              "  unpickles PATH with full pickle (runs any code in it): only for files you trust", file=sys.stderr)
        return 2
    try:
        convert(args[1])
    except (OSError, CheckpointError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args[1]} (original kept as {args[1]}.bak)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
