"""The trace store's reader: lazy, filtered, row group by row group, with checksums.

`TraceReader` opens a store by reading only file footers; `iter_batches` yields `TraceBatch`es one row
group at a time, skipping row groups by their min/max statistics and reading only the requested
columns, so memory is bounded by one row group whatever the size of the store. A truncated,
corrupt, foreign or newer file raises `TraceStoreError` naming it (`on_error="skip"` reads the rest).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kat_diag.traces.ragged import Ragged, TraceBatch
from kat_diag.traces.schema import (
    _META_TOP_N,
    _META_VERSION,
    _PART_RE,
    _SCALAR_TYPES,
    _STATS_COLUMNS,
    ALL_COLUMNS,
    DEFAULT_TOP_N,
    MANIFEST_NAME,
    RAGGED_COLUMNS,
    SCHEMA_VERSION,
    TRACES_DIRNAME,
    TRUTH_COLUMNS,
    UNKNOWN_POSITION,
    TraceStoreError,
    part_identity,
    read_manifest,
    schema,
    split_rollout_id,
    store_identity,
)


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Type equality ignoring the names of list item fields (Parquet renames them to 'element')."""
    if pa.types.is_fixed_size_list(a) or pa.types.is_fixed_size_list(b):
        return (pa.types.is_fixed_size_list(a) and pa.types.is_fixed_size_list(b)
                and a.list_size == b.list_size and _same_type(a.value_type, b.value_type))
    if pa.types.is_list(a) or pa.types.is_list(b):
        return pa.types.is_list(a) and pa.types.is_list(b) and _same_type(a.value_type, b.value_type)
    return a.equals(b)


@dataclass(frozen=True)
class _RowGroup:
    path: Path
    index: int
    num_rows: int
    stats: dict[str, tuple[Any, Any]]  # column -> (min, max)


def _check_file(path: Path) -> tuple[pq.FileMetaData, int]:
    """Open a part file's footer and check it is ours; returns (metadata, top_n)."""
    try:
        md = pq.read_metadata(path)
        arrow_schema = md.schema.to_arrow_schema()
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ... for damaged footers
        raise TraceStoreError(f"{path}: corrupt or truncated Parquet file ({e})") from e
    meta = md.metadata or {}
    if _META_VERSION not in meta:
        raise TraceStoreError(f"{path}: not a kat-diag trace file (no {_META_VERSION.decode()} metadata)")
    try:
        version = int(meta[_META_VERSION])
        top_n = int(meta.get(_META_TOP_N, b"0"))
    except ValueError as e:
        raise TraceStoreError(f"{path}: malformed kat-diag metadata ({e})") from e
    if version > SCHEMA_VERSION:
        raise TraceStoreError(
            f"{path}: written with trace schema version {version}, this kat-diag reads up to "
            f"{SCHEMA_VERSION}; upgrade kat-diag to read it"
        )
    expected = schema(top_n)
    for field in expected:
        if version < 2 and field.name in TRUTH_COLUMNS:
            continue
        idx = arrow_schema.get_field_index(field.name)
        if idx < 0:
            raise TraceStoreError(f"{path}: not a kat-diag trace file (missing column {field.name!r})")
        if not _same_type(arrow_schema.field(idx).type, field.type):
            found = arrow_schema.field(idx).type
            raise TraceStoreError(f"{path}: column {field.name!r} has type {found}, expected {field.type}")
    return md, top_n


def _column_stats(md: pq.FileMetaData, rg: int) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    group = md.row_group(rg)
    for j in range(group.num_columns):
        col = group.column(j)
        name = col.path_in_schema
        if name in _STATS_COLUMNS and col.is_stats_set and col.statistics.has_min_max:
            out[name] = (col.statistics.min, col.statistics.max)
    return out


def _as_set(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, int, np.integer)):
        return [value]
    return list(value)


@dataclass(frozen=True)
class TraceFilter:
    """Which rollouts to read. Every given criterion must hold; None = no constraint.

    ``steps`` is an inclusive ``(first, last)`` range, either end may be None.
    """

    steps: tuple[int | None, int | None] | None = None
    policy: Sequence[str] | None = None
    rollout_ids: np.ndarray | None = None
    stop_reason: Sequence[str] | None = None
    rank: Sequence[int] | None = None

    @classmethod
    def build(
        cls,
        steps: tuple[int | None, int | None] | None = None,
        policy: str | Iterable[str] | None = None,
        rollout_ids: int | Iterable[int] | None = None,
        stop_reason: str | Iterable[str] | None = None,
        rank: int | Iterable[int] | None = None,
    ) -> TraceFilter:
        ids = _as_set(rollout_ids)
        return cls(
            steps=None if steps is None else (steps[0], steps[1]),
            policy=_as_set(policy),
            rollout_ids=None if ids is None else np.unique(np.asarray(ids, dtype=np.int64)),
            stop_reason=_as_set(stop_reason),
            rank=_as_set(rank),
        )

    @property
    def columns(self) -> list[str]:
        """Columns needed to evaluate the filter row by row."""
        cols = []
        if self.steps is not None:
            cols.append("step")
        if self.policy is not None:
            cols.append("policy")
        if self.rollout_ids is not None:
            cols.append("rollout_id")
        if self.stop_reason is not None:
            cols.append("stop_reason")
        if self.rank is not None:
            cols.append("rank")
        return cols

    def may_match(self, stats: dict[str, tuple[Any, Any]]) -> bool:
        """False when the row group's min/max statistics prove no row matches."""
        if self.steps is not None and "step" in stats:
            lo, hi = stats["step"]
            if (self.steps[0] is not None and hi < self.steps[0]) or (
                self.steps[1] is not None and lo > self.steps[1]
            ):
                return False
        if self.rollout_ids is not None and "rollout_id" in stats:
            lo, hi = stats["rollout_id"]
            i = np.searchsorted(self.rollout_ids, lo)
            if i >= len(self.rollout_ids) or self.rollout_ids[i] > hi:
                return False
        for name, wanted in (("policy", self.policy), ("stop_reason", self.stop_reason), ("rank", self.rank)):
            if wanted is not None and name in stats:
                lo, hi = stats[name]
                if not any(lo <= w <= hi for w in wanted):
                    return False
        return True

    def mask(self, table: pa.Table) -> np.ndarray:
        m = np.ones(table.num_rows, dtype=bool)
        if self.steps is not None:
            step = table.column("step").to_numpy()
            if self.steps[0] is not None:
                m &= step >= self.steps[0]
            if self.steps[1] is not None:
                m &= step <= self.steps[1]
        if self.rollout_ids is not None:
            m &= np.isin(table.column("rollout_id").to_numpy(), self.rollout_ids)
        for name, wanted in (("policy", self.policy), ("stop_reason", self.stop_reason), ("rank", self.rank)):
            if wanted is not None:
                m &= pc.is_in(table.column(name), value_set=pa.array(wanted)).to_numpy(zero_copy_only=False)
        return m


def _column_to_numpy(name: str, col: pa.ChunkedArray) -> Any:
    arr = col.combine_chunks()
    if name in RAGGED_COLUMNS:
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
        offsets = np.zeros(len(arr) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = arr.flatten()
        if pa.types.is_fixed_size_list(flat.type):
            n = flat.type.list_size
            values = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, n)
        else:
            values = flat.to_numpy(zero_copy_only=False)
        return Ragged(offsets, values)
    if name == "correct":
        return pc.fill_null(pc.cast(arr, pa.int8()), -1).to_numpy()
    if name in ("first_error", "loop_start"):
        return pc.fill_null(pc.cast(arr, pa.int32()), UNKNOWN_POSITION).to_numpy()
    return arr.to_numpy(zero_copy_only=False)


class TraceReader:
    """Lazy, filtered reader of a trace store (``RUN`` or ``RUN/traces``).

    Opening lists the part files and reads only their footers (schema, version and per-row-group
    statistics). :meth:`iter_batches` then reads one row group at a time, skipping row groups whose
    statistics exclude the filter and reading only the requested columns, so memory stays bounded
    by one row group whatever the size of the store. Files are read in (rank, sequence) order.

    ``on_error="raise"`` (default) raises :class:`TraceStoreError` naming the first corrupt, truncated
    or foreign file; ``on_error="skip"`` warns and reads the rest (a file damaged inside a data page is
    detected only when that row group is read: the rows already returned from it stay returned).

    A store is one run's: every part file carries the run identity of the store's manifest
    (`kat_diag.traces.schema.part_identity`), so a file copied in from another run is refused like a
    foreign file (``allow_foreign=True`` reads it anyway), and rollout ids must be unique across the
    store (a file copied in twice is refused, whatever ``on_error``). The id check reads the
    ``rollout_id`` column only of row groups whose id ranges overlap (several ranks, or a copy).
    """

    def __init__(self, path: str | os.PathLike[str], on_error: str = "raise", *, allow_foreign: bool = False) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        self.on_error = on_error
        path = Path(path)
        if not path.exists():
            raise TraceStoreError(f"trace store not found: {path} does not exist")
        if (path / TRACES_DIRNAME).is_dir():
            path = path / TRACES_DIRNAME
        elif not path.is_dir():
            raise TraceStoreError(f"{path} is not a directory (expected a run dir or its traces/ dir)")
        self.dir = path
        manifest_path = path / MANIFEST_NAME
        files = sorted(p for p in path.iterdir() if _PART_RE.match(p.name))
        if not manifest_path.exists() and not files:
            raise TraceStoreError(
                f"no trace store at {path}: no {MANIFEST_NAME} and no part-*.parquet files "
                f"(expected RUN/{TRACES_DIRNAME}/)"
            )
        self.manifest: dict[str, Any] = read_manifest(manifest_path) if manifest_path.exists() else {}
        self.config: dict[str, Any] = self.manifest.get("config", {}) or {}
        self.top_n: int = int(self.manifest.get("top_n", DEFAULT_TOP_N))
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        self._row_groups: list[_RowGroup] = []
        self.run_identity = store_identity(self.manifest)
        for f in files:
            try:
                md, top_n = _check_file(f)
                self._check_identity(f, md, top_n, allow_foreign)
            except TraceStoreError as e:
                self._fail(f, e)
                continue
            self.top_n = top_n
            self.files.append(f)
            for i in range(md.num_row_groups):
                self._row_groups.append(_RowGroup(f, i, md.row_group(i).num_rows, _column_stats(md, i)))
        self._check_unique_ids()

    def _check_identity(self, path: Path, md: pq.FileMetaData, top_n: int, allow_foreign: bool) -> None:
        """A part file belongs to this store: same run identity (unless allow_foreign) and top_n."""
        if "top_n" in self.manifest and top_n != int(self.manifest["top_n"]):
            raise TraceStoreError(f"{path}: holds top_n={top_n} teacher tokens, the store's manifest says "
                                  f"{self.manifest['top_n']} (a file from another store?)")
        mine = part_identity(md.metadata or {})
        if mine is None:
            return
        if self.run_identity is None:  # no manifest: the first file names the run
            self.run_identity = mine
        elif mine != self.run_identity and not allow_foreign:
            raise TraceStoreError(
                f"{path}: written by another run ({mine!r}; this store is run {self.run_identity!r}): a trace "
                f"file copied in from elsewhere? Move it out of {self.dir}, or pass --allow-foreign "
                "(allow_foreign=True) to read it")

    def _check_unique_ids(self) -> None:
        """Rollout ids are unique across the store; duplicates (a file copied in twice, two runs'
        files merged) would be counted twice by every analysis, so they are refused."""
        ranges = []
        for i, rg in enumerate(self._row_groups):
            lo, hi = rg.stats.get("rollout_id", (-(2**63), 2**63 - 1))
            ranges.append((lo, hi, i))
        ranges.sort()
        suspect: set[int] = set()
        reach, reach_i = None, -1
        for lo, hi, i in ranges:  # row groups whose id ranges overlap another's
            if reach is not None and lo <= reach:
                suspect.update((i, reach_i))
            if reach is None or hi > reach:
                reach, reach_i = hi, i
        if not suspect:
            return
        ids, where = [], []
        by_file: dict[Path, list[int]] = {}
        for i in sorted(suspect):
            by_file.setdefault(self._row_groups[i].path, []).append(self._row_groups[i].index)
        for path, groups in by_file.items():
            try:
                col = pq.ParquetFile(path).read_row_groups(groups, columns=["rollout_id"]).column(0).to_numpy()
            except Exception:  # noqa: BLE001 - a damaged page is reported when its row group is read
                continue
            ids.append(col)
            where.append(np.full(len(col), len(where)))
        if not ids:
            return
        flat, src = np.concatenate(ids), np.concatenate(where)
        order = np.argsort(flat, kind="stable")
        dup = np.flatnonzero(np.diff(flat[order]) == 0)
        if len(dup):
            a, b = order[dup[0]], order[dup[0] + 1]
            files = list(by_file)
            rid = int(flat[a])
            step, rank, index = split_rollout_id(rid)
            raise TraceStoreError(
                f"{self.dir}: rollout id {rid} (step {step}, rank {rank}, #{index}) is stored twice, in "
                f"{files[src[a]].name} and {files[src[b]].name}: a trace file copied in twice or from another "
                "run? Move the extra file out of the store")

    def _fail(self, path: Path, error: Exception) -> None:
        if self.on_error == "raise":
            raise error if isinstance(error, TraceStoreError) else TraceStoreError(f"{path}: {error}")
        warnings.warn(f"skipping trace file: {error}", stacklevel=3)
        self.skipped.append((path, str(error)))

    @property
    def num_rows(self) -> int:
        """Number of rollouts in the readable files (from the footers, nothing is scanned)."""
        return sum(rg.num_rows for rg in self._row_groups)

    def _resolve(self, columns: Sequence[str] | None) -> list[str]:
        cols = list(ALL_COLUMNS) if columns is None else list(dict.fromkeys(columns))
        unknown = [c for c in cols if c not in ALL_COLUMNS]
        if unknown:
            raise ValueError(f"unknown trace columns: {unknown}")
        return cols

    def _read_group(self, rg: _RowGroup, columns: list[str], flt: TraceFilter) -> TraceBatch | None:
        try:
            pf = pq.ParquetFile(rg.path, page_checksum_verification=True)
            fcols = flt.columns
            mask = None
            if fcols:
                mask = flt.mask(pf.read_row_group(rg.index, columns=fcols))
                if not mask.any():
                    return None
            present = set(pf.schema_arrow.names)
            table = pf.read_row_group(rg.index, columns=[c for c in columns if c in present])
            for c in columns:  # a schema-1 file has no ground-truth columns: they read as nulls
                if c not in present:
                    table = table.append_column(c, pa.nulls(table.num_rows, _SCALAR_TYPES[c]))
        except Exception as e:
            err = TraceStoreError(f"{rg.path}: corrupt data in row group {rg.index} ({e})")
            self._fail(rg.path, err)
            return None
        if mask is not None and not mask.all():
            table = table.filter(pa.array(mask))
        return TraceBatch({c: _column_to_numpy(c, table.column(c)) for c in columns}, table.num_rows)

    def iter_batches(
        self,
        columns: Sequence[str] | None = None,
        *,
        steps: tuple[int | None, int | None] | None = None,
        policy: str | Iterable[str] | None = None,
        rollout_ids: int | Iterable[int] | None = None,
        stop_reason: str | Iterable[str] | None = None,
        rank: int | Iterable[int] | None = None,
    ) -> Iterator[TraceBatch]:
        """Yield the matching rollouts one row group at a time (never the whole store at once).

        ``columns`` (default: all) selects what is read; filters: inclusive step range, policy
        name(s), rollout id(s), stop reason(s), rank(s).
        """
        cols = self._resolve(columns)
        flt = TraceFilter.build(steps, policy, rollout_ids, stop_reason, rank)
        for rg in self._row_groups:
            if not flt.may_match(rg.stats):
                continue
            batch = self._read_group(rg, cols, flt)
            if batch is not None and batch.num_rows:
                yield batch

    def read(
        self,
        columns: Sequence[str] | None = None,
        **filters: Any,
    ) -> TraceBatch:
        """Collect the matching rollouts into one batch (for small selections; same filters)."""
        cols = self._resolve(columns)
        return TraceBatch.concat(list(self.iter_batches(cols, **filters)), cols)

    def iter_steps(
        self,
        columns: Sequence[str] | None = None,
        **filters: Any,
    ) -> Iterator[tuple[int, TraceBatch]]:
        """Yield ``(step, batch of that step's rollouts)`` in increasing step order.

        Row groups are read in order of their smallest step and a step is emitted once no unread row
        group can still contain it, so memory holds only the steps that overlap the row groups
        being read (a few steps for a store written step by step), not the store.
        """
        cols = self._resolve(list(columns or ALL_COLUMNS) + ["step"])
        flt = TraceFilter.build(**filters)
        groups = [rg for rg in self._row_groups if flt.may_match(rg.stats)]
        groups.sort(key=lambda rg: (rg.stats.get("step", (-(2**63), 0))[0], str(rg.path), rg.index))
        pending: list[TraceBatch] = []

        def emit(upto: float) -> Iterator[tuple[int, TraceBatch]]:
            nonlocal pending
            if not pending:
                return
            batch = TraceBatch.concat(pending, cols)
            step = batch["step"]
            ready = step < upto
            if not ready.any():
                return
            done = batch.take(np.flatnonzero(ready))
            rest = np.flatnonzero(~ready)
            pending = [batch.take(rest)] if len(rest) else []
            order = np.argsort(done["step"], kind="stable")
            done = done.take(order)
            bounds = np.flatnonzero(np.diff(done["step"])) + 1
            for idx in np.split(np.arange(done.num_rows), bounds):
                yield int(done["step"][idx[0]]), done.take(idx)

        for rg in groups:
            lo = rg.stats.get("step", (-(2**63), 0))[0]
            yield from emit(lo)
            batch = self._read_group(rg, cols, flt)
            if batch is not None and batch.num_rows:
                pending.append(batch)
        yield from emit(float("inf"))

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        """One rollout as a dict (all columns); raises KeyError if absent."""
        batch = self.read(rollout_ids=[int(rollout_id)])
        if batch.num_rows == 0:
            raise KeyError(f"rollout {rollout_id} not in {self.dir}")
        return batch.row(0)
