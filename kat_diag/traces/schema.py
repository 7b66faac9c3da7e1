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
                  correct: bool, null when not graded;
                  ground truth (schema 2, `kat_diag.world.truth`; null on real data and in schema-1 files):
                  first_error: int32 (token index of the first token that leaves the reference
                  solution, -1 = none), loop_start: int32 (token index where a repetition loop
                  starts, -1 = none), verdict: string (right | wrong | loop | unfinished)
    per token     token_ids: list<int32>, student_logprob / teacher_logprob / kl (full-vocabulary
                  reverse KL) / kl_sampled (log pi_s(y_t) - log pi_T(y_t)) / student_entropy:
                  list<float32>; teacher_top_ids: list<fixed_size_list<int32, n>>,
                  teacher_top_probs: list<fixed_size_list<float32, n>> (n = top_n of the store);
                  token_text: list<string>, null when the writer was not given decoded tokens

Row groups hold at most ``row_group_tokens`` tokens, so a reader's memory is bounded by one row
group of the requested columns whatever the size of the store.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2

DEFAULT_TOP_N = 5


MANIFEST_NAME = "_manifest.json"  # "_" prefix: pyarrow/pandas dataset readers skip it

TRACES_DIRNAME = "traces"

_META_VERSION = b"kat_diag.schema_version"

_META_TOP_N = b"kat_diag.top_n"

_META_RUN = b"kat_diag.run"

_META_RANK = b"kat_diag.rank"

# The store's run identity (a random id made with its manifest, `run_id` there): every part file
# carries it, so readers refuse a file copied in from another run. Stores made before it existed use
# the run name (`run`) as their identity.
_META_RUN_ID = b"kat_diag.run_id"

_PART_RE = re.compile(r"^part-r(\d{5})-(\d{8})\.parquet$")

_TMP_PREFIX = ".tmp-"


# Bit layout of rollout ids built by make_rollout_id: step | rank | index within (step, rank).
_ID_INDEX_BITS = 20

_ID_RANK_BITS = 12


SCALAR_COLUMNS: tuple[str, ...] = (
    "run", "step", "rank", "rollout_id", "prompt_id", "policy", "tau", "onset", "fire",
    "stop_reason", "gen_len", "kept_len", "text", "correct", "first_error", "loop_start", "verdict",
)

# Columns added by schema version 2; files of version 1 lack them and read as nulls.
TRUTH_COLUMNS: tuple[str, ...] = ("first_error", "loop_start", "verdict")

UNKNOWN_POSITION = -2  # how a null first_error / loop_start reads (no ground truth)

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
    "first_error": pa.int32(), "loop_start": pa.int32(), "verdict": pa.string(),
}

_TOKEN_DTYPES: dict[str, np.dtype] = {
    "token_ids": np.dtype(np.int32), "student_logprob": np.dtype(np.float32),
    "teacher_logprob": np.dtype(np.float32), "kl": np.dtype(np.float32),
    "kl_sampled": np.dtype(np.float32), "student_entropy": np.dtype(np.float32),
    "teacher_top_ids": np.dtype(np.int32), "teacher_top_probs": np.dtype(np.float32),
}

_STRING_SCALARS = ("run", "prompt_id", "policy", "stop_reason", "text", "verdict")

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
# Reader


def store_identity(manifest: dict[str, Any]) -> str | None:
    """The run identity of a store from its manifest: `run_id`, else (older stores) the run name."""
    value = manifest.get("run_id") or manifest.get("run")
    return None if value is None else str(value)


def part_identity(metadata: dict[bytes, bytes]) -> str | None:
    """The run identity a part file carries (`kat_diag.run_id`, else the run name); None if neither."""
    value = metadata.get(_META_RUN_ID) or metadata.get(_META_RUN)
    return None if value is None else value.decode("utf-8", "replace")


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
