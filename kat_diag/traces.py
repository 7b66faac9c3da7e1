"""Per-token KL trace store: schema, crash-safe writer, lazy filtered reader.

Every analysis in kat-diag (heatmaps, phases, vocabulary shift, KAT replay) reads the per-token KL
traces offline, without the models. A real run produces millions of rollouts of thousands of tokens,
and training jobs die (pre-emption, OOM, SIGKILL), so the store is:

* **Apache Parquet** with standard Arrow list types, one row per rollout, readable by pandas, polars
  and DuckDB as well as by :class:`TraceReader`;
* **append-only**: each :meth:`TraceWriter.flush` writes one new immutable file
  ``RUN/traces/part-r{rank:05d}-{seq:08d}.parquet``; nothing is ever rewritten in place;
* **crash-safe**: a file is written under a temporary name (``.tmp-...``), fsynced, renamed into
  place and the directory fsynced. A kill at any moment leaves every flushed file complete and at
  most one temporary file, which readers ignore and the next writer of that rank removes;
* **versioned**: ``SCHEMA_VERSION`` is stored in every file's key-value metadata and in
  ``RUN/traces/_manifest.json`` (with the run config); a reader refuses newer versions clearly.

Columns (one row per rollout)::

    per rollout   run: string, step: int64, rank: int32, rollout_id: int64, prompt_id: string,
                  policy: string, tau: float64 (NaN = undefined), onset: int32 (-1 = none),
                  fire: int32 (-1 = not fired), stop_reason: string (eos, max_len, policy, ...),
                  gen_len: int32 (= number of stored tokens), kept_len: int32, text: string,
                  correct: bool, null when not graded
    per token     token_ids: list<int32>, student_logprob / teacher_logprob / kl (full-vocabulary
                  reverse KL) / kl_sampled (log pi_s(y_t) - log pi_T(y_t)) / student_entropy:
                  list<float32>; teacher_top_ids: list<fixed_size_list<int32, n>>,
                  teacher_top_probs: list<fixed_size_list<float32, n>> (n = top_n of the store);
                  token_text: list<string>, null when the writer was not given decoded tokens

Row groups hold at most ``row_group_tokens`` tokens, so a reader's memory is bounded by one row
group of the requested columns whatever the size of the store.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
DEFAULT_TOP_N = 5

MANIFEST_NAME = "_manifest.json"  # "_" prefix: pyarrow/pandas dataset readers skip it
TRACES_DIRNAME = "traces"
_META_VERSION = b"kat_diag.schema_version"
_META_TOP_N = b"kat_diag.top_n"
_META_RUN = b"kat_diag.run"
_META_RANK = b"kat_diag.rank"
_PART_RE = re.compile(r"^part-r(\d{5})-(\d{8})\.parquet$")
_TMP_PREFIX = ".tmp-"

# Bit layout of rollout ids built by make_rollout_id: step | rank | index within (step, rank).
_ID_INDEX_BITS = 20
_ID_RANK_BITS = 12

SCALAR_COLUMNS: tuple[str, ...] = (
    "run", "step", "rank", "rollout_id", "prompt_id", "policy", "tau", "onset", "fire",
    "stop_reason", "gen_len", "kept_len", "text", "correct",
)
TOKEN_COLUMNS: tuple[str, ...] = (
    "token_ids", "student_logprob", "teacher_logprob", "kl", "kl_sampled", "student_entropy",
)
TOP_COLUMNS: tuple[str, ...] = ("teacher_top_ids", "teacher_top_probs")
TEXT_COLUMN = "token_text"
RAGGED_COLUMNS: tuple[str, ...] = TOKEN_COLUMNS + TOP_COLUMNS + (TEXT_COLUMN,)
ALL_COLUMNS: tuple[str, ...] = SCALAR_COLUMNS + RAGGED_COLUMNS

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "run": pa.string(), "step": pa.int64(), "rank": pa.int32(), "rollout_id": pa.int64(),
    "prompt_id": pa.string(), "policy": pa.string(), "tau": pa.float64(), "onset": pa.int32(),
    "fire": pa.int32(), "stop_reason": pa.string(), "gen_len": pa.int32(),
    "kept_len": pa.int32(), "text": pa.string(), "correct": pa.bool_(),
}
_TOKEN_DTYPES: dict[str, np.dtype] = {
    "token_ids": np.dtype(np.int32), "student_logprob": np.dtype(np.float32),
    "teacher_logprob": np.dtype(np.float32), "kl": np.dtype(np.float32),
    "kl_sampled": np.dtype(np.float32), "student_entropy": np.dtype(np.float32),
    "teacher_top_ids": np.dtype(np.int32), "teacher_top_probs": np.dtype(np.float32),
}
_STRING_SCALARS = ("run", "prompt_id", "policy", "stop_reason", "text")
# Columns with min/max statistics, used to skip row groups without reading them.
_STATS_COLUMNS = ["step", "rank", "rollout_id", "policy", "stop_reason", "fire", "gen_len"]


class TraceStoreError(RuntimeError):
    """A trace store or one of its files cannot be read (missing, corrupt, foreign, too new)."""


def schema(top_n: int = DEFAULT_TOP_N) -> pa.Schema:
    """The Arrow schema of a store whose teacher top-n columns hold ``top_n`` entries per token."""
    fields = [pa.field(name, _SCALAR_TYPES[name]) for name in SCALAR_COLUMNS]
    for name in TOKEN_COLUMNS:
        fields.append(pa.field(name, pa.list_(pa.from_numpy_dtype(_TOKEN_DTYPES[name]))))
    for name in TOP_COLUMNS:
        inner = pa.from_numpy_dtype(_TOKEN_DTYPES[name])
        fields.append(pa.field(name, pa.list_(pa.list_(inner, top_n))))
    fields.append(pa.field(TEXT_COLUMN, pa.list_(pa.string())))
    meta = {_META_VERSION: str(SCHEMA_VERSION).encode(), _META_TOP_N: str(top_n).encode()}
    return pa.schema(fields, metadata=meta)


def make_rollout_id(step: int | np.ndarray, rank: int | np.ndarray, index: int | np.ndarray) -> Any:
    """Run-unique rollout id ``step << 32 | rank << 20 | index`` (rank < 4096, index < 2**20)."""
    step_a, rank_a, index_a = (np.asarray(x, dtype=np.int64) for x in (step, rank, index))
    if np.any(rank_a < 0) or np.any(rank_a >= 1 << _ID_RANK_BITS):
        raise ValueError(f"rank must be in [0, {1 << _ID_RANK_BITS})")
    if np.any(index_a < 0) or np.any(index_a >= 1 << _ID_INDEX_BITS):
        raise ValueError(f"rollout index must be in [0, {1 << _ID_INDEX_BITS})")
    if np.any(step_a < 0) or np.any(step_a >= 1 << 31):
        raise ValueError("step must be in [0, 2**31)")
    out = (step_a << 32) | (rank_a << _ID_INDEX_BITS) | index_a
    return int(out) if out.ndim == 0 else out


def split_rollout_id(rollout_id: int) -> tuple[int, int, int]:
    """Inverse of :func:`make_rollout_id`: ``(step, rank, index)``."""
    rid = int(rollout_id)
    return rid >> 32, (rid >> _ID_INDEX_BITS) & ((1 << _ID_RANK_BITS) - 1), rid & ((1 << _ID_INDEX_BITS) - 1)


# --------------------------------------------------------------------------------------------------
# Ragged arrays and batches (the reader's output form, also accepted by the writer)


@dataclass(frozen=True)
class Ragged:
    """Concatenated per-token values of many rollouts: rollout i is ``values[offsets[i]:offsets[i+1]]``.

    ``offsets`` is int64 of length n + 1 starting at 0; ``values`` is 1-D, or 2-D ``[tokens, top_n]``
    for the teacher top-n columns, or an object array of str for ``token_text``.
    """

    offsets: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_list(cls, arrays: Sequence[np.ndarray], dtype: Any = None) -> Ragged:
        arrays = [np.asarray(a, dtype=dtype) for a in arrays]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        return cls(offsets, values)

    def take(self, idx: np.ndarray) -> Ragged:
        """The rollouts at positions ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(idx) == 0:
            return Ragged(offsets, self.values[:0])
        starts = self.offsets[idx]
        # Gather all token positions at once: start of each rollout repeated + position within it.
        pos = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Ragged(offsets, self.values[pos])

    @staticmethod
    def concat(parts: Sequence[Ragged]) -> Ragged:
        if not parts:
            return Ragged(np.zeros(1, dtype=np.int64), np.zeros(0))
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        tails = [p.offsets[1:] + shift for p, shift in zip(parts, shifts, strict=True)]
        offsets = np.concatenate([np.zeros(1, dtype=np.int64), *tails])
        return Ragged(offsets.astype(np.int64), np.concatenate([p.values for p in parts]))


class TraceBatch(Mapping[str, Any]):
    """Columns of a set of rollouts: scalar columns as 1-D numpy arrays, per-token columns as Ragged.

    String columns are numpy object arrays of ``str``; ``correct`` is int8 with -1 = not graded.
    """

    def __init__(self, columns: dict[str, Any], num_rows: int) -> None:
        self._columns = columns
        self.num_rows = num_rows

    def __getitem__(self, key: str) -> Any:
        return self._columns[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    def __repr__(self) -> str:
        return f"TraceBatch(rows={self.num_rows}, columns={list(self._columns)})"

    def row(self, i: int) -> dict[str, Any]:
        """Rollout ``i`` as a dict of Python scalars and per-token numpy arrays."""
        out: dict[str, Any] = {}
        for name, col in self._columns.items():
            if isinstance(col, Ragged):
                out[name] = col[i]
            else:
                value = col[i]
                out[name] = value.item() if isinstance(value, np.generic) else value
        if "correct" in out:
            out["correct"] = None if out["correct"] < 0 else bool(out["correct"])
        return out

    def take(self, idx: np.ndarray) -> TraceBatch:
        idx = np.asarray(idx, dtype=np.int64)
        cols = {k: (v.take(idx) if isinstance(v, Ragged) else v[idx]) for k, v in self._columns.items()}
        return TraceBatch(cols, len(idx))

    @staticmethod
    def concat(batches: Sequence[TraceBatch], columns: Sequence[str]) -> TraceBatch:
        if not batches:
            return TraceBatch({c: _empty_column(c) for c in columns}, 0)
        cols: dict[str, Any] = {}
        for name in batches[0]:
            parts = [b[name] for b in batches]
            cols[name] = Ragged.concat(parts) if isinstance(parts[0], Ragged) else np.concatenate(parts)
        return TraceBatch(cols, sum(b.num_rows for b in batches))


def _empty_column(name: str) -> Any:
    if name in RAGGED_COLUMNS:
        dtype = _TOKEN_DTYPES.get(name, np.dtype(object))
        return Ragged(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=dtype))
    if name == "correct":
        return np.zeros(0, dtype=np.int8)
    if name in _STRING_SCALARS:
        return np.zeros(0, dtype=object)
    return np.zeros(0, dtype=_SCALAR_TYPES[name].to_pandas_dtype())


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
    ) -> None:
        if not 0 <= rank < 1 << _ID_RANK_BITS:
            raise ValueError(f"rank must be in [0, {1 << _ID_RANK_BITS})")
        if top_n < 1:
            raise ValueError("top_n must be >= 1")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / TRACES_DIRNAME
        self.rank = int(rank)
        self.run_name = run_name if run_name is not None else self.run_dir.resolve().name
        self.flush_every = flush_every
        self.max_buffer_tokens = max_buffer_tokens
        self.top_n = int(top_n)
        self.row_group_tokens = row_group_tokens
        self.compression = compression
        self.schema = schema(self.top_n).with_metadata(
            {**schema(self.top_n).metadata, _META_RUN: self.run_name.encode(),
             _META_RANK: str(self.rank).encode()}
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_manifest(config)
        self._seq = self._next_seq()
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        self._buffered_tokens = 0
        self._step_counts: dict[int, int] = {}
        self.files_written: list[Path] = []
        self.rows_written = 0
        self._closed = False

    # -- setup

    def _write_manifest(self, config: dict[str, Any] | None) -> None:
        path = self.dir / MANIFEST_NAME
        if path.exists():
            existing = read_manifest(path)  # raises on a newer version / corrupt manifest
            if existing.get("top_n", DEFAULT_TOP_N) != self.top_n:
                raise TraceStoreError(
                    f"{path}: store has top_n={existing.get('top_n')}, writer was given top_n={self.top_n}"
                )
            return
        manifest = {
            "format": "kat-diag-traces",
            "schema_version": SCHEMA_VERSION,
            "run": self.run_name,
            "top_n": self.top_n,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config or {},
            # The training loss's estimator (the `kl` column is always the full-vocabulary KL the
            # detector saw); None for stores written without training (record).
            "loss": {"estimator": (config or {}).get("loss"), "topk": (config or {}).get("topk")},
            "columns": {f.name: str(f.type) for f in self.schema},
        }
        _atomic_write_bytes(path, json.dumps(manifest, indent=2, default=str).encode())

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


# --------------------------------------------------------------------------------------------------
# Reader


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check a store manifest; raises TraceStoreError if corrupt or of a newer version."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TraceStoreError(f"{path}: unreadable trace manifest ({e})") from e
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise TraceStoreError(f"{path}: not a kat-diag trace manifest (no schema_version)")
    if version > SCHEMA_VERSION:
        raise TraceStoreError(
            f"{path}: trace store has schema version {version}, this kat-diag reads up to "
            f"{SCHEMA_VERSION}; upgrade kat-diag to read it"
        )
    return manifest


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
    """

    def __init__(self, path: str | os.PathLike[str], on_error: str = "raise") -> None:
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
        for f in files:
            try:
                md, top_n = _check_file(f)
            except TraceStoreError as e:
                self._fail(f, e)
                continue
            self.top_n = top_n
            self.files.append(f)
            for i in range(md.num_row_groups):
                self._row_groups.append(_RowGroup(f, i, md.row_group(i).num_rows, _column_stats(md, i)))

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
            table = pf.read_row_group(rg.index, columns=columns)
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
