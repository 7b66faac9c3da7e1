"""The trace store's writer: append-only and crash-safe, one writer per (run, rank).

`TraceWriter.append` validates and buffers rollouts; `flush` writes them as one new immutable Parquet
file under a temporary name, fsyncs it, renames it into place and fsyncs the directory, so a run
killed at any moment leaves every flushed rollout readable and nothing half-written.

A store that is only meaningful once whole (`kat-diag score`, `kat-diag traces import`) is written
into ``OUT/traces_partial/traces`` and moved to ``OUT/traces`` by `publish_staged` when it is
complete: until then ``OUT`` holds no store, so nothing partial looks complete (the staged store
stays readable as ``OUT/traces_partial``, and a resumed `score` continues it).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kat_diag.traces.ragged import Ragged
from kat_diag.traces.schema import (
    _ID_RANK_BITS,
    _META_RANK,
    _META_RUN,
    _META_RUN_ID,
    _PART_RE,
    _STATS_COLUMNS,
    _TMP_PREFIX,
    _TOKEN_DTYPES,
    ALL_COLUMNS,
    DEFAULT_KL_SOURCE,
    DEFAULT_TOP_N,
    KL_SOURCES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    TEXT_COLUMN,
    TOKEN_COLUMNS,
    TOP_COLUMNS,
    TRACES_DIRNAME,
    TraceStoreError,
    kl_source_of,
    make_rollout_id,
    read_manifest,
    schema,
    store_identity,
)

# --------------------------------------------------------------------------------------------------
# Writer


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry itself reaches the disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _start_writeback(f: Any) -> None:
    # On Linux, FADV_DONTNEED starts asynchronous writeback of the dirty pages written so far and drops
    # the clean ones: the disk works while the next row group is encoded, the final fsync has little
    # left to wait for, and trace files do not crowd the trainer's page cache.
    if hasattr(os, "posix_fadvise"):
        f.flush()
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # pragma: no cover - filesystems without fadvise
            pass


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


STAGING_DIRNAME = "traces_partial"


def staging_dir(out: str | os.PathLike[str]) -> Path:
    """The run directory a whole-or-nothing store is written into before `publish_staged`."""
    return Path(out) / STAGING_DIRNAME


def update_manifest(store_dir: str | os.PathLike[str], **fields: Any) -> None:
    """Add or replace top-level manifest fields of ``store_dir`` (a run dir or its traces/), atomically."""
    d = Path(store_dir)
    d = d / TRACES_DIRNAME if (d / TRACES_DIRNAME).is_dir() else d
    path = d / MANIFEST_NAME
    manifest = read_manifest(path)
    manifest.update(fields)
    _atomic_write_bytes(path, json.dumps(manifest, indent=2, default=str).encode())


def publish_staged(out: str | os.PathLike[str]) -> Path:
    """Move the staged store ``OUT/traces_partial/traces`` to ``OUT/traces`` (one rename) and remove
    the staging directory; returns the store's path. ``OUT/traces`` must not exist yet."""
    out = Path(out)
    src, dst = staging_dir(out) / TRACES_DIRNAME, out / TRACES_DIRNAME
    if dst.exists():
        raise TraceStoreError(f"{dst} already exists: not publishing {src} over it")
    os.rename(src, dst)
    _fsync_dir(out)
    for entry in os.scandir(staging_dir(out)):  # only lock-free leftovers of a writer (none expected)
        if entry.is_file():
            os.unlink(entry.path)
    os.rmdir(staging_dir(out))
    return dst


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write `path` atomically unless it exists; False if it did. The ranks of a run start their
    writers at once: exactly one manifest (one run id) must win, and nobody may read half of it."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: last writer wins (one process per store there)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return True


def _loss_of(config: dict[str, Any]) -> dict[str, Any]:
    """The training loss as the manifest names it: its estimator, k of top-k, and gamma for iwopd."""
    loss = {"estimator": config.get("loss"), "topk": config.get("topk")}
    if config.get("loss") == "iwopd":
        loss["iw_gamma"] = config.get("iw_gamma")
    return loss


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class TraceWriter:
    """Append-only, crash-safe writer of one rank's rollouts to ``run_dir/traces/``.

    ``append(batch)`` takes n rollouts as a dict of columns:

    * per-rollout columns: a length-n sequence / 1-D array, or one scalar broadcast to all n.
      Required: ``step``, ``prompt_id``, ``policy``. Optional (default): ``rollout_id``
      (``make_rollout_id(step, rank, i)``, i counting this rank's rollouts of that step),
      ``tau`` (NaN), ``onset`` (-1), ``fire`` (-1), ``stop_reason`` ("eos"), ``gen_len``
      (number of tokens; must equal it when given), ``kept_len`` (gen_len), ``text`` (""),
      ``correct`` (None; accepts None/True/False or -1/0/1). ``run`` and ``rank`` come from the writer.
    * per-token columns: a list of n 1-D arrays (numpy, lists or CPU tensors), or a
      :class:`Ragged`. Required: ``token_ids``, ``kl``. Optional: ``student_logprob``,
      ``teacher_logprob``, ``student_entropy`` (NaN when absent), ``kl_sampled`` (default
      ``student_logprob - teacher_logprob`` when both are given, else NaN), ``token_text``
      (list of n lists of str; null when absent).
    * top-n columns ``teacher_top_ids`` / ``teacher_top_probs``: list of n ``[len_i, top_n]`` arrays,
      or a Ragged with 2-D values (-1 / NaN when absent).

    Appends are validated and converted to Arrow immediately (errors surface at the call site) and
    buffered; :meth:`flush` writes the buffer as one new file. A flush happens automatically when
    ``flush_every`` rollouts or ``max_buffer_tokens`` tokens are buffered. Files never collide
    across ranks (the rank is in the name) or restarts (the sequence number continues).
    One writer per (run, rank) at a time.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rank: int = 0,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        flush_every: int | None = None,
        max_buffer_tokens: int = 4_000_000,
        top_n: int = DEFAULT_TOP_N,
        row_group_tokens: int = 1 << 20,
        compression: str = "snappy",
        kl_source: str = DEFAULT_KL_SOURCE,
    ) -> None:
        if not 0 <= rank < 1 << _ID_RANK_BITS:
            raise ValueError(f"rank must be in [0, {1 << _ID_RANK_BITS})")
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        if kl_source not in KL_SOURCES:
            raise ValueError(f"kl_source must be one of {', '.join(KL_SOURCES)}, got {kl_source!r}")
        self.kl_source = kl_source
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / TRACES_DIRNAME
        self.rank = int(rank)
        self.run_name = run_name if run_name is not None else self.run_dir.resolve().name
        self.flush_every = flush_every
        self.max_buffer_tokens = max_buffer_tokens
        self.top_n = int(top_n)
        self.row_group_tokens = row_group_tokens
        self.compression = compression
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = self._write_manifest(config)
        self.schema = schema(self.top_n).with_metadata(
            {**schema(self.top_n).metadata, _META_RUN: self.run_name.encode(),
             _META_RANK: str(self.rank).encode(), _META_RUN_ID: self.run_id.encode()}
        )
        self._seq = self._next_seq()
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        self._buffered_tokens = 0
        self._step_counts: dict[int, int] = {}
        self._ids = np.zeros(0, dtype=np.int64)  # sorted ids this writer was given
        self.files_written: list[Path] = []
        self.rows_written = 0
        self._closed = False

    # -- setup

    def _write_manifest(self, config: dict[str, Any] | None) -> str:
        """Create the manifest if the store is new; returns the store's run identity (`store_identity`)."""
        path = self.dir / MANIFEST_NAME
        if path.exists():
            existing = read_manifest(path)  # raises on a newer version / corrupt manifest
            if existing.get("top_n", DEFAULT_TOP_N) != self.top_n:
                raise TraceStoreError(
                    f"{path}: store has top_n={existing.get('top_n')}, writer was given top_n={self.top_n}"
                )
            if kl_source_of(existing) != self.kl_source:
                raise TraceStoreError(
                    f"{path}: store holds kl_source={kl_source_of(existing)}, writer was given {self.kl_source}"
                )
            return store_identity(existing) or self.run_name
        run_id = uuid.uuid4().hex
        manifest = {
            "format": "kat-diag-traces",
            "schema_version": SCHEMA_VERSION,
            "run": self.run_name,
            "run_id": run_id,  # every part file carries it (readers refuse files of other runs)
            "top_n": self.top_n,
            # What the `kl` column holds: "full" here, "k1" / "k3" for imported sampled-token logs.
            "kl_source": self.kl_source,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config or {},
            # The training loss's estimator (with kl_source "full" the `kl` column is the
            # full-vocabulary KL the detector saw); None for stores written without training (record).
            "loss": _loss_of(config or {}),
            "columns": {f.name: str(f.type) for f in schema(self.top_n)},
        }
        if not _create_exclusive(path, json.dumps(manifest, indent=2, default=str).encode()):
            return self._write_manifest(config)  # another rank created it first: use its run id
        return run_id

    def _next_seq(self) -> int:
        seq = 0
        prefix = f"{_TMP_PREFIX}part-r{self.rank:05d}-"
        for entry in os.scandir(self.dir):
            m = _PART_RE.match(entry.name)
            if m and int(m.group(1)) == self.rank:
                seq = max(seq, int(m.group(2)) + 1)
            elif entry.name.startswith(prefix):
                # Left by a killed writer of this rank: never renamed, so never part of the store.
                os.unlink(entry.path)
        return seq

    # -- append

    def append(self, batch: Mapping[str, Any]) -> None:
        """Buffer n rollouts given as a dict of columns (format in the class docstring)."""
        if self._closed:
            raise RuntimeError("TraceWriter is closed")
        record = self._to_record_batch(batch)
        if record.num_rows == 0:
            return
        self._check_new_ids(record.column("rollout_id").to_numpy())
        self._buffer.append(record)
        self._buffered_rows += record.num_rows
        self._buffered_tokens += int(pc.sum(record.column("gen_len")).as_py() or 0)
        if (self.flush_every is not None and self._buffered_rows >= self.flush_every) or (
            self._buffered_tokens >= self.max_buffer_tokens
        ):
            self.flush()

    def _to_record_batch(self, batch: Mapping[str, Any]) -> pa.RecordBatch:
        unknown = set(batch) - set(ALL_COLUMNS)
        if unknown:
            raise ValueError(f"unknown trace columns: {sorted(unknown)}")
        for name in ("token_ids", "kl", "step", "prompt_id", "policy"):
            if name not in batch:
                raise ValueError(f"trace batch is missing required column {name!r}")
        token_ids = self._ragged(batch["token_ids"], "token_ids")
        n = len(token_ids)
        lengths = token_ids.lengths
        total = int(token_ids.offsets[-1])

        def scalar(name: str, default: Any, dtype: Any) -> np.ndarray:
            value = batch.get(name, default)
            if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
                return np.full(n, value, dtype=dtype)
            arr = _to_numpy(value, dtype=dtype)
            if arr.shape != (n,):
                raise ValueError(f"column {name!r} has shape {arr.shape}, expected ({n},)")
            return arr

        cols: dict[str, pa.Array] = {}
        cols["run"] = pa.array(np.full(n, self.run_name, dtype=object), pa.string())
        step = scalar("step", None, np.int64)
        cols["step"] = pa.array(step)
        cols["rank"] = pa.array(np.full(n, self.rank, dtype=np.int32))
        if "rollout_id" in batch:
            cols["rollout_id"] = pa.array(scalar("rollout_id", None, np.int64))
        else:
            cols["rollout_id"] = pa.array(self._default_ids(step))
        for name in ("prompt_id", "policy"):
            cols[name] = pa.array([str(v) for v in scalar(name, None, object)], pa.string())
        cols["tau"] = pa.array(scalar("tau", np.nan, np.float64))
        cols["onset"] = pa.array(scalar("onset", -1, np.int32))
        cols["fire"] = pa.array(scalar("fire", -1, np.int32))
        cols["stop_reason"] = pa.array([str(v) for v in scalar("stop_reason", "eos", object)], pa.string())
        gen_len = scalar("gen_len", 0, np.int64) if "gen_len" in batch else lengths
        if not np.array_equal(gen_len, lengths):
            bad = int(np.flatnonzero(gen_len != lengths)[0])
            raise ValueError(
                f"gen_len must equal the number of stored tokens (rollout {bad}: "
                f"gen_len={gen_len[bad]}, tokens={lengths[bad]})"
            )
        cols["gen_len"] = pa.array(lengths.astype(np.int32))
        cols["kept_len"] = pa.array(scalar("kept_len", 0, np.int32) if "kept_len" in batch
                                    else lengths.astype(np.int32))
        cols["text"] = pa.array([str(v) for v in scalar("text", "", object)], pa.string())
        cols["correct"] = pa.array([_as_correct(v) for v in scalar("correct", None, object)], pa.bool_())
        for name in ("first_error", "loop_start"):
            cols[name] = pa.array([None if v is None else int(v) for v in scalar(name, None, object)], pa.int32())
        cols["verdict"] = pa.array([None if v is None else str(v) for v in scalar("verdict", None, object)],
                                   pa.string())

        ragged: dict[str, Ragged] = {"token_ids": token_ids}
        for name in ("student_logprob", "teacher_logprob", "kl", "kl_sampled", "student_entropy"):
            if name in batch:
                ragged[name] = self._ragged(batch[name], name)
        if "kl_sampled" not in ragged and "student_logprob" in ragged and "teacher_logprob" in ragged:
            diff = ragged["student_logprob"].values - ragged["teacher_logprob"].values
            ragged["kl_sampled"] = Ragged(token_ids.offsets, diff.astype(np.float32))
        for name in TOP_COLUMNS:
            if name in batch:
                ragged[name] = self._ragged(batch[name], name, top=True)
        for name, r in ragged.items():
            if len(r) != n or not np.array_equal(r.offsets, token_ids.offsets):
                raise ValueError(f"per-token column {name!r} does not match token_ids in rollout lengths")

        offsets = pa.array(token_ids.offsets.astype(np.int32))
        if total >= 2**31:
            raise ValueError("one append may hold at most 2**31 - 1 tokens")
        for name in TOKEN_COLUMNS:
            values = ragged[name].values if name in ragged else np.full(total, np.nan, np.float32)
            cols[name] = pa.ListArray.from_arrays(offsets, pa.array(values))
        for name in TOP_COLUMNS:
            if name in ragged:
                values = ragged[name].values
            else:
                fill = -1 if name == "teacher_top_ids" else np.nan
                values = np.full((total, self.top_n), fill, dtype=_TOKEN_DTYPES[name])
            inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.top_n)
            cols[name] = pa.ListArray.from_arrays(offsets, inner)
        if TEXT_COLUMN in batch:
            texts = list(batch[TEXT_COLUMN])
            if len(texts) != n:
                raise ValueError(f"token_text has {len(texts)} rollouts, expected {n}")
            for i, t in enumerate(texts):
                if t is not None and len(t) != lengths[i]:
                    raise ValueError(f"token_text of rollout {i} has {len(t)} tokens, expected {lengths[i]}")
            cols[TEXT_COLUMN] = pa.array([None if t is None else [str(s) for s in t] for t in texts],
                                         pa.list_(pa.string()))
        else:
            cols[TEXT_COLUMN] = pa.nulls(n, pa.list_(pa.string()))
        return pa.RecordBatch.from_arrays([cols[f.name] for f in self.schema], schema=self.schema)

    def _check_new_ids(self, ids: np.ndarray) -> None:
        """Rollout ids are unique in a store: refuse an append that repeats one of this writer's
        (readers refuse duplicates across files too)."""
        new = np.sort(ids)
        again = np.zeros(len(new), dtype=bool)
        if len(self._ids):
            pos = np.minimum(np.searchsorted(self._ids, new), len(self._ids) - 1)
            again = self._ids[pos] == new
        twice = np.flatnonzero(np.diff(new) == 0)
        if again.any() or len(twice):
            dup = int(new[np.flatnonzero(again)[0]] if again.any() else new[twice[0]])
            raise ValueError(f"rollout_id {dup} appended twice to {self.dir} (rollout ids must be unique in a store)")
        self._ids = np.sort(np.concatenate([self._ids, new]))

    def _ragged(self, value: Any, name: str, top: bool = False) -> Ragged:
        dtype = _TOKEN_DTYPES[name]
        if isinstance(value, Ragged):
            r = Ragged(_to_numpy(value.offsets, np.int64), _to_numpy(value.values, dtype))
        else:
            r = Ragged.from_list([_to_numpy(a, dtype) for a in value], dtype)
        if top:
            if r.values.ndim != 2 or r.values.shape[1] != self.top_n:
                if len(r.values) == 0:
                    r = Ragged(r.offsets, r.values.reshape(0, self.top_n))
                else:
                    raise ValueError(f"{name} must hold [len, {self.top_n}] arrays, got {r.values.shape[1:]}")
        elif r.values.ndim != 1:
            raise ValueError(f"{name} must hold 1-D arrays per rollout")
        if r.offsets[0] != 0 or len(r.values) != r.offsets[-1]:
            raise ValueError(f"{name}: offsets must start at 0 and end at len(values)")
        return r

    def _default_ids(self, step: np.ndarray) -> np.ndarray:
        index = np.empty(len(step), dtype=np.int64)
        for i, s in enumerate(step.tolist()):
            index[i] = self._step_counts.get(s, 0)
            self._step_counts[s] = index[i] + 1
        return make_rollout_id(step, self.rank, index)

    # -- flush / close

    def flush(self) -> Path | None:
        """Write the buffered rollouts as one new Parquet file; returns its path (None if empty).

        Once this returns, the rollouts survive a crash of the process (the file and the directory
        entry are fsynced).
        """
        if not self._buffer:
            return None
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        name = f"part-r{self.rank:05d}-{self._seq:08d}.parquet"
        final = self.dir / name
        if final.exists():
            raise TraceStoreError(f"{final} already exists: two writers for rank {self.rank}?")
        tmp = self.dir / f"{_TMP_PREFIX}{name}.{os.getpid()}"
        with open(tmp, "wb") as f:
            with pq.ParquetWriter(
                f,
                self.schema,
                compression=self.compression,
                use_dictionary=["run", "prompt_id", "policy", "stop_reason"],
                write_statistics=_STATS_COLUMNS,
                write_page_checksum=True,  # readers detect damaged pages instead of decoding garbage
            ) as pw:
                for start, stop in _row_groups(table.column("gen_len").to_numpy(), self.row_group_tokens):
                    pw.write_table(table.slice(start, stop - start), row_group_size=stop - start)
                    _start_writeback(f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        self._seq += 1
        self.files_written.append(final)
        self.rows_written += table.num_rows
        self._buffer.clear()
        self._buffered_rows = 0
        self._buffered_tokens = 0
        return final

    def close(self) -> None:
        """Flush what is buffered; the writer cannot be used afterwards."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_correct(v: Any) -> bool | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    iv = int(v)
    if iv not in (-1, 0, 1):
        raise ValueError(f"correct must be None/True/False or -1/0/1, got {v!r}")
    return None if iv < 0 else bool(iv)


def _row_groups(lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Split rows into consecutive groups of at most max_tokens tokens (at least one row each)."""
    groups, start, acc = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > start and acc + n > max_tokens:
            groups.append((start, i))
            start, acc = i, 0
        acc += n
    if start < len(lengths):
        groups.append((start, len(lengths)))
    return groups
