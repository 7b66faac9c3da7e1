"""Lazy access patterns the analyses share: a cheap scalar pass, stage ranges, seeded samples, and
what a store's KL column holds.

A real store holds millions of rollouts of thousands of tokens, so no analysis loads it whole:
a first pass reads only per-rollout scalar columns (a few bytes per rollout), the analysis picks
the rollouts it needs from them (a step range, a seeded sample), and a second pass reads the
per-token columns of those rollouts only, one row group at a time (`TraceReader.iter_batches`).

A store imported from another trainer (`kat_diag.traces.interchange`) may hold a sampled-token
estimate in its ``kl`` column (kl_source k1 / k3) and lack columns it never logged. Every analysis
that reads ``kl`` works on such a store and says which estimator it shows (`kl_note`,
`mark_estimator`); one that needs a column the store lacks refuses in one line (`require_columns`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kat_diag.traces.ragged import TraceBatch
from kat_diag.traces.reader import TraceReader
from kat_diag.traces.schema import KL_SOURCE_LABELS

# --------------------------------------------------------------------------------------------------
# What the kl column holds


def kl_note(reader: TraceReader) -> str | None:
    """One line for the output of an analysis of a store whose ``kl`` is a sampled-token estimate
    (None for the full-vocabulary KL)."""
    source = reader.kl_source
    if source == "full":
        return None
    return (f"KL here is {KL_SOURCE_LABELS[source]} (kl_source {source}, imported), not the full-vocabulary KL: "
            f"window means, tau and fires of the detector on {source} differ from those on full KL")


def mark_estimator(fig: Any, reader: TraceReader) -> None:
    """Label a figure of a sampled-estimator store with the estimator it shows (nothing for full KL)."""
    if reader.kl_source != "full":
        from kat_diag.views.palette import WARNING

        fig.text(0.005, 0.003, f"KL = {KL_SOURCE_LABELS[reader.kl_source]} (kl_source {reader.kl_source})",
                 fontsize=8, color=WARNING, ha="left", va="bottom")


def require_columns(reader: TraceReader, columns: Sequence[str], analysis: str) -> None:
    """Refuse (ValueError, one line naming the column) when the store never received a column the
    analysis needs, e.g. `vocab` on a store imported without the teacher's top-n tokens."""
    missing = [c for c in columns if c in reader.absent_columns]
    if missing:
        raise ValueError(f"{analysis} needs the {', '.join(missing)} column{'s' if len(missing) > 1 else ''}, which "
                         f"the store {reader.dir} (imported, kl_source {reader.kl_source}) does not have")


def lacks_columns(run_dir: Any, columns: Sequence[str], analysis: str) -> str | None:
    """`require_columns` as a reason string for `figures` (None when the store has them or is unreadable:
    the analysis itself reports that)."""
    from kat_diag.traces.schema import TraceStoreError

    try:
        require_columns(TraceReader(run_dir), columns, analysis)
    except ValueError as e:
        return str(e)
    except TraceStoreError:
        return None
    return None



def scan_scalars(reader: TraceReader, columns: Sequence[str], **filters: Any) -> dict[str, np.ndarray]:
    """The given per-rollout columns of every matching rollout, concatenated (never token columns)."""
    cols = list(dict.fromkeys(columns))
    parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
    for b in reader.iter_batches(cols, **filters):
        for c in cols:
            parts[c].append(np.asarray(b[c]))
    return {c: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for c, v in parts.items()}


def parse_range(text: str | None, name: str) -> tuple[int, int] | None:
    """'A:B' (inclusive) -> (A, B); None stays None."""
    if text is None:
        return None
    try:
        lo, hi = text.split(":", 1)
        out = (int(lo), int(hi))
    except ValueError:
        raise ValueError(f"{name} expects A:B (inclusive step range), got {text!r}") from None
    if out[0] > out[1]:
        raise ValueError(f"{name} expects A <= B, got {text!r}")
    return out


def stage_ranges(steps: np.ndarray, early: tuple[int, int] | None = None, late: tuple[int, int] | None = None,
                 share: float = 0.1) -> dict[str, tuple[int, int]]:
    """Step ranges of the early and late stages: by default the first and the last ``share`` of the
    recorded step span (at least one step each). A store of a single step has one stage, ``all``."""
    steps = np.asarray(steps)
    if steps.size == 0:
        return {}
    lo, hi = int(steps.min()), int(steps.max())
    if lo == hi and early is None and late is None:
        return {"all": (lo, hi)}
    n = max(1, math.ceil((hi - lo + 1) * share))
    return {"early": early or (lo, lo + n - 1), "late": late or (hi - n + 1, hi)}


def in_range(steps: np.ndarray, rng: tuple[int, int]) -> np.ndarray:
    steps = np.asarray(steps)
    return (steps >= rng[0]) & (steps <= rng[1])


def sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded uniform sample of min(n, k) of n rows without replacement."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def read_rollouts(reader: TraceReader, rollout_ids: np.ndarray, columns: Sequence[str]) -> TraceBatch:
    """The given rollouts (any order in, the order of ``rollout_ids`` out), only ``columns``.

    Reads row group by row group with the ids as filter, so memory is the selection plus one row
    group of the requested columns.
    """
    ids = np.asarray(rollout_ids, dtype=np.int64)
    cols = list(dict.fromkeys(["rollout_id", *columns]))
    if ids.size == 0:
        return TraceBatch.concat([], cols)
    batch = TraceBatch.concat(list(reader.iter_batches(cols, rollout_ids=ids)), cols)
    got = batch["rollout_id"]
    order = np.argsort(got, kind="stable")
    pos = order[np.minimum(np.searchsorted(got[order], ids), max(len(got) - 1, 0))] if len(got) else ids[:0]
    if len(got) == 0 or not np.array_equal(got[pos], ids):
        raise ValueError("some requested rollout ids are not in the store")
    return batch.take(pos)



def kl_estimator(reader: TraceReader) -> str:
    """How the store's ``kl`` column was computed, for figure labels: the manifest's ``kl_source``
    (full | k1 | k3; stores written before it was recorded hold the full-vocabulary KL)."""
    source = str((reader.manifest or {}).get("kl_source") or "full")
    return {"full": "reverse KL (full vocabulary)", "k1": "reverse KL, k1 estimate (sampled token)",
            "k3": "reverse KL, k3 estimate (sampled token)"}.get(source, f"reverse KL ({source})")
