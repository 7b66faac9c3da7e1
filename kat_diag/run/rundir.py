"""A run directory belongs to one run, written by one process at a time.

Without ownership, `train --out DIR` into an existing run appends to its metrics and traces
(duplicate rollout ids, two policies in one store) and overwrites its `config.json` and `final/`;
two runs started into one directory interleave their writes. This module decides, before any
compute, whether a command may write into a directory:

* `check_out`: the path is a directory (or can be created) and writable; a run already there is
  refused unless `resume` (continue it) or `overwrite` (start over) is asked for; a live lock is
  refused. Cheap and side-effect free: the CLI calls it before loading anything.
* `claim`: creates the directory, takes the lock file `.kat-diag.lock` (owner pid and host;
  `O_CREAT | O_EXCL`, so two starters cannot both win), takes over a stale lock left by a dead
  process, and with `overwrite` removes the previous run's entries (only the names a run writes:
  a mistyped `--out $HOME --overwrite` does not empty a home directory).
* `Claim.release`: drops the lock; after a failure, a directory the claim created that holds
  nothing else is removed again, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOCK_NAME = ".kat-diag.lock"
# What a run writes (trainer, record, score, traces import): a directory holding any of these holds a run.
RUN_ENTRIES = ("config.json", "metrics.jsonl", "traces", "checkpoints", "final", "traces_discarded",
               "record_config.json", "traces_partial")


class RunDirError(ValueError):
    """The directory cannot be used for this run (one-line message naming the option and path)."""


def run_entries(path: Path) -> list[str]:
    """The run entries present in `path` (empty when it holds no run)."""
    return [name for name in RUN_ENTRIES if (path / name).exists()] if path.is_dir() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_lock(path: Path) -> dict | None:
    """The lock of a run directory ({pid, host}), or None when there is none or it is unreadable."""
    try:
        data = json.loads((path / LOCK_NAME).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {"pid": -1}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1}  # half-written or garbage: treated as stale


def lock_is_live(lock: dict | None) -> bool:
    """A lock held by a running process on this host. A lock from another host counts as live."""
    if lock is None:
        return False
    if lock.get("host") not in (None, socket.gethostname()):
        return True
    pid = lock.get("pid", -1)
    return pid > 0 and pid != os.getpid() and _pid_alive(pid)


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out(path: str | Path, *, resume: bool = False, overwrite: bool = False, option: str = "--out",
              owns_runs: bool = True) -> None:
    """Refuse, with a one-line RunDirError, an output directory this command must not write into.

    `owns_runs=False` (e.g. `record`'s output) still checks writability and a live lock, and
    refuses an existing store unless `overwrite`.
    """
    p = Path(path)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or start it over")
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{option} {p} is a file, not a directory")
    anchor = _first_existing(p)
    if not anchor.is_dir():
        raise RunDirError(f"{option} {p}: {anchor} is a file, not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise RunDirError(f"{option} {p}: {anchor} is not writable")
    entries = run_entries(p)
    if entries and not (resume or overwrite):
        what = "a run" if owns_runs else "output"
        hint = "pass --resume to continue it or --overwrite to replace it" if owns_runs else \
            "pass --overwrite to replace it or choose another directory"
        raise RunDirError(f"{option} {p} already holds {what} ({', '.join(entries)}): {hint}")
    if resume and not (p / "config.json").exists():
        raise RunDirError(f"--resume: {p} holds no run to continue (no config.json)")
    lock = read_lock(p)
    if lock_is_live(lock):
        raise RunDirError(f"{option} {p} is in use by process {lock.get('pid')} on {lock.get('host', '?')} "
                          f"(lock file {p / LOCK_NAME}); wait for it to finish or stop it")


@dataclass
class Claim:
    """Ownership of a run directory by this process, until `release`."""

    path: Path
    created: list[Path] = field(default_factory=list)  # directories this claim created, deepest last
    released: bool = False

    def release(self, failed: bool = False) -> None:
        if self.released:
            return
        self.released = True
        lock = read_lock(self.path)
        if lock is not None and lock.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
        if failed:
            for d in reversed(self.created):  # only directories we made, and only if still empty
                with contextlib.suppress(OSError):
                    d.rmdir()


def claim(path: str | Path, *, resume: bool = False, overwrite: bool = False, option: str = "--out",
          owns_runs: bool = True) -> Claim:
    """Check (see `check_out`), create the directory, take its lock; with `overwrite` clear the old run."""
    p = Path(path)
    check_out(p, resume=resume, overwrite=overwrite, option=option, owns_runs=owns_runs)
    created = []
    for d in reversed([p, *p.absolute().parents]):
        if not d.exists():
            created.append(d)
    try:
        p.mkdir(parents=True, exist_ok=True)
        _take_lock(p, option)
    except OSError as e:
        Claim(p, created).release(failed=True)
        raise RunDirError(f"{option} {p}: cannot create the run directory ({e.strerror or e})") from e
    c = Claim(p, created)
    if overwrite:
        for name in RUN_ENTRIES:
            target = p / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    return c


def _take_lock(p: Path, option: str) -> None:
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    lock_path = p / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            lock = read_lock(p)
            if lock_is_live(lock):
                raise RunDirError(f"{option} {p} is in use by process {lock.get('pid')} "
                                  f"(lock file {lock_path}); wait for it to finish or stop it") from None
            # Stale (its process is gone): take it over. Remove, then race for O_EXCL again.
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return
    raise RunDirError(f"{option} {p}: another process took the lock {lock_path} at the same time")


@contextlib.contextmanager
def owned(path: str | Path, *, resume: bool = False, overwrite: bool = False, enabled: bool = True,
          option: str = "--out", owns_runs: bool = True) -> Iterator[Claim | None]:
    """`claim` for the duration of a block; on an exception a directory it created and left empty goes."""
    if not enabled:
        yield None
        return
    c = claim(path, resume=resume, overwrite=overwrite, option=option, owns_runs=owns_runs)
    try:
        yield c
    except BaseException:
        c.release(failed=True)
        raise
    c.release()
