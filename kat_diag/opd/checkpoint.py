"""Checkpoints of a run: `checkpoints/step-N/` written atomically, and trainer state read safely.

A checkpoint directory holds the student (`save_pretrained`), its tokenizer and `trainer_state.pt`;
it is written under a temporary name and renamed, so a crash never leaves half a checkpoint
(`save_checkpoint`, `latest_checkpoint`; on resume `_discard_traces_after` moves trace files of the
steps being redone aside).

`--resume` reads `checkpoints/step-N/trainer_state.pt` (optimizer, scheduler, termination policy,
RNG state, step). Researchers share run directories, and `torch.load(weights_only=False)` would run
any code a crafted pickle names. The state is therefore written as plain containers of tensors and
Python scalars and read back with `torch.load(weights_only=True)`, whose unpickler builds only
tensors, dicts, lists, tuples, strings and numbers: a file naming any other callable is refused with
a one-line error before anything in it runs. numpy values a policy may hold are stored as tensors
(and numpy scalars as Python numbers) so no numpy type needs to be allowlisted.

A checkpoint that this loader refuses but that you wrote yourself with an older kat-diag can be
converted once, explicitly trusting it:
`python -m kat_diag.opd.checkpoint convert RUN/checkpoints/step-N/trainer_state.pt --trust`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kat_diag.opd.config import CKPT_DIRNAME, STATE_NAME


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
            f"python -m kat_diag.opd.checkpoint convert {p} --trust"
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
        print("usage: python -m kat_diag.opd.checkpoint convert PATH/trainer_state.pt --trust\n"
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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def latest_checkpoint(run: Path) -> Path | None:
    d = run / CKPT_DIRNAME
    if not d.exists():
        return None
    done = sorted(p for p in d.glob("step-*") if (p / STATE_NAME).exists())
    return done[-1] if done else None


def save_checkpoint(run: Path, step: int, student, tokenizer, opt, sched, policy, keep: int,
                    full: tuple[dict | None, dict | None] = (None, None)) -> Path:
    """Write to a temporary directory, then rename: a crash never leaves a half checkpoint."""
    root = run / CKPT_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, state_dict=full[0])  # full: FSDP's gathered state dicts (fsdp.full_state)
    tokenizer.save_pretrained(tmp)
    optim_state = full[1] if full[1] is not None else opt.state_dict()
    save_state(tmp / STATE_NAME, {"step": step, "optimizer": optim_state, "scheduler": sched.state_dict(),
                                          "policy": policy.state_dict(), "torch_rng": torch.get_rng_state()})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _discard_traces_after(run: Path, step: int, rank: int) -> int:
    """On resume: move trace files written after the checkpoint aside (their steps are redone).

    A file that also holds steps up to the checkpoint (the writer flushes on its own when its buffer
    fills, so a file can straddle a checkpoint) is moved aside too and replaced by a copy with only
    those steps: otherwise the redone steps would be stored twice (the reader refuses duplicates).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    tdir = run / "traces"
    moved = 0
    if not tdir.exists():
        return 0
    for f in sorted(tdir.glob(f"part-r{rank:05d}-*.parquet")):
        try:
            steps = pq.read_table(f, columns=["step"]).column("step").to_numpy()
        except Exception:
            continue  # the reader reports corrupt files itself
        if not steps.size or steps.max() <= step:
            continue
        dest = run / "traces_discarded"
        dest.mkdir(exist_ok=True)
        if steps.min() <= step:  # straddles the checkpoint: keep its earlier steps in a new file
            table = pq.read_table(f)
            kept = table.filter(pa.array(steps <= step))
            tmp = f.with_name(f".tmp-{f.name}.{os.getpid()}")
            pq.write_table(kept, tmp, compression="snappy", write_page_checksum=True)  # keeps the run metadata
            shutil.copy2(f, dest / f.name)  # a crash from here on leaves the original in place
            os.replace(tmp, f)
        else:
            os.replace(f, dest / f.name)
        moved += 1
    return moved
