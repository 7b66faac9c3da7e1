"""The trace interchange format: another trainer's per-token arrays in, a kat-diag store's rollouts out.

Most OPD runs are not kat-diag runs. A trainer that logged, per rollout, the sampled token ids and
either the full-vocabulary reverse KL or the two log-probs of the sampled tokens can have every
kat-diag analysis without any model: `import_file` turns such a log into a trace store, and
`export_store` writes any store in the same format (so a kat-diag run exported and imported again
is the same store). The user's page is ``docs/trace-format.md``; this docstring is the reference.

Format, version 1 (`FORMAT_VERSION`). JSON Lines (one rollout per line; ``.jsonl``/``.json``) or
Parquet (one rollout per row), or a directory of such files (read in natural order: ``2.jsonl``
before ``10.jsonl``). Field names can be mapped (``fields={"token_ids": "target_tokens"}``);
fields the format does not know are ignored.

* required: ``step`` (int >= 0), ``prompt_id`` (string or int), ``token_ids`` (list of int >= 0),
  and the KL: ``kl`` (list of float), or, for ``kl_source`` k1 / k3 without ``kl``,
  ``student_logprob`` and ``teacher_logprob`` (lists of float: log-probs of the sampled tokens,
  untempered), from which ``kl`` is computed: k1 = s - t; k3 as verl's ``kl_penalty("low_var_kl")``
  with s = the actor's and t = the reference's (here: the teacher's) log-prob:
  ``d = clamp(t - s, -20, 20); k3 = clamp(exp(d) - d - 1, -10, 10)``.
* optional per token (same length as ``token_ids``): ``loss_mask`` (0/1; positions with 0 are
  dropped from every per-token field before storing: prompt tokens, padding, tool output),
  ``student_logprob``, ``teacher_logprob``, ``kl_sampled`` (default s - t when both log-probs are
  given), ``student_entropy``, ``token_text`` (list of str), ``teacher_top_ids`` /
  ``teacher_top_probs`` (list of n-lists; n = the store's top_n). ``null`` in a float list = NaN.
* optional per rollout: ``rollout_id`` (int, unique), ``rank`` (int), ``policy`` (default "kat" when
  any of tau / onset / fire is given, else "none"), ``tau``, ``onset``, ``fire``, ``kept_len`` (where
  the trainer ran KAT; -1 / null = none), ``stop_reason`` (default "eos"), ``text``, ``correct``
  (true / false / null, or 1 / 0 / -1), ground truth ``first_error``, ``loop_start``, ``verdict``.
* header (optional): the first line of a JSONL file, or the Parquet key-value metadata
  ``kat_diag.interchange``, a JSON object ``{"format": "kat-diag-trace-interchange", "version": 1,
  "kl_source": ..., "top_n": ..., "run": ..., "config": {...}}``. Its ``config`` (a run config; its
  ``kat`` section gives the analyses their KAT settings) becomes the store manifest's config.

``kl_source`` (full | k1 | k3, `KL_SOURCES`) is what the ``kl`` column holds; it is recorded in the
store's manifest, and analyses label or refuse by it. Imports are whole or nothing: rows are
validated as they are read, the store is staged in ``OUT/traces_partial`` and published as
``OUT/traces`` only when every row passed (a bad row raises ValueError naming the file, line or row,
and field, and leaves no store behind).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kat_diag.traces.reader import TraceReader
from kat_diag.traces.schema import (
    DEFAULT_TOP_N,
    KL_SOURCES,
    SCALAR_COLUMNS,
    TOKEN_COLUMNS,
    TOP_COLUMNS,
    UNKNOWN_POSITION,
)
from kat_diag.traces.writer import TraceWriter, publish_staged, staging_dir, update_manifest

FORMAT_NAME = "kat-diag-trace-interchange"
FORMAT_VERSION = 1
PARQUET_META_KEY = b"kat_diag.interchange"

ROLLOUT_FIELDS: tuple[str, ...] = (
    "rank", "rollout_id", "step", "prompt_id", "policy", "tau", "onset", "fire", "stop_reason", "kept_len",
    "text", "correct", "first_error", "loop_start", "verdict",
)
FLOAT_TOKEN_FIELDS: tuple[str, ...] = ("kl", "student_logprob", "teacher_logprob", "kl_sampled", "student_entropy")
TOKEN_FIELDS: tuple[str, ...] = ("token_ids", *FLOAT_TOKEN_FIELDS, "loss_mask", "token_text")
FIELDS: tuple[str, ...] = ROLLOUT_FIELDS + TOKEN_FIELDS + TOP_COLUMNS
REQUIRED: tuple[str, ...] = ("step", "prompt_id", "token_ids")
KAT_FIELDS: tuple[str, ...] = ("tau", "onset", "fire")

# Rows converted before one TraceWriter.append (the writer flushes by its own token budget).
_APPEND_ROWS = 256


# --------------------------------------------------------------------------------------------------
# The estimators


def k1(student_logprob: np.ndarray, teacher_logprob: np.ndarray) -> np.ndarray:
    """k1 = log p_s(y) - log p_T(y): unbiased for KL(p_s || p_T) when y ~ p_s; can be negative."""
    return np.asarray(student_logprob, np.float64) - np.asarray(teacher_logprob, np.float64)


def k3(student_logprob: np.ndarray, teacher_logprob: np.ndarray) -> np.ndarray:
    """k3 as verl's ``kl_penalty(logprob=s, ref_logprob=t, "low_var_kl")``: with d = t - s clamped to
    [-20, 20], ``exp(d) - d - 1`` clamped to [-10, 10] (>= 0, unbiased before the clamps)."""
    d = np.clip(np.asarray(teacher_logprob, np.float64) - np.asarray(student_logprob, np.float64), -20.0, 20.0)
    return np.clip(np.exp(d) - d - 1.0, -10.0, 10.0)


ESTIMATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"k1": k1, "k3": k3}


# --------------------------------------------------------------------------------------------------
# Reading rows


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def input_files(path: str | os.PathLike[str]) -> list[Path]:
    """The JSONL / Parquet files of ``path`` (a file, or a directory read in natural order)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in (".jsonl", ".json", ".parquet")
                        and not f.name.startswith(".")), key=_natural_key)
        if not files:
            raise ValueError(f"{p}: a directory without .jsonl or .parquet files")
        return files
    if p.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{p}: unsupported format {p.suffix!r} (use .jsonl, .json or .parquet)")
    return [p]


def _is_header(rec: Any) -> bool:
    return isinstance(rec, dict) and rec.get("format") == FORMAT_NAME


def read_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The format header of the first file of ``path`` (see the module docstring), or None."""
    f = input_files(path)[0]
    if f.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.read_schema(f).metadata or {}
        if PARQUET_META_KEY not in meta:
            return None
        header = json.loads(meta[PARQUET_META_KEY])
    else:
        header = None
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        return None  # reported with its line number when the rows are read
                    header = rec if _is_header(rec) else None
                    break
    if header is None:
        return None
    version = header.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{f}: interchange format version {version!r}; this kat-diag reads up to {FORMAT_VERSION}")
    return header


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every row of ``path``; ``where`` names the file and line (JSONL) or row
    (Parquet). Header lines are skipped; a line that is not a JSON object raises ValueError."""
    for f in input_files(path):
        if f.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            i = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=512):
                for rec in batch.to_pylist():
                    yield f"{f} row {i}", rec
                    i += 1
            continue
        with f.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{f}:{lineno}: a row must be a JSON object, got {type(rec).__name__}")
                if _is_header(rec):
                    continue
                yield f"{f}:{lineno}", rec


# --------------------------------------------------------------------------------------------------
# One record -> store values


class FieldMap:
    """Format field -> the record's key (`--field KEY=NAME`), and error messages that name both.
    `known`: the format's fields (the interchange format's by default; `kat-diag score` passes its own)."""

    def __init__(self, mapping: Mapping[str, str] | None, known: Sequence[str] = FIELDS) -> None:
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} in the field mapping; known: {', '.join(known)}")
        self.map = mapping

    def key(self, name: str) -> str:
        return self.map.get(name, name)

    def label(self, name: str) -> str:
        key = self.key(name)
        return f"field {name!r}" if key == name else f"field {name!r} (file field {key!r})"

    def get(self, rec: Mapping[str, Any], name: str) -> Any:
        return rec.get(self.key(name))

    def has(self, rec: Mapping[str, Any], name: str) -> bool:
        return rec.get(self.key(name)) is not None


def _int(value: Any, where: str, label: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{where}: {label} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {label} must be >= {minimum}, got {value}")
    return int(value)


def _float(value: Any, where: str, label: str) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {label} must be a number, got {value!r}")
    return float(value)


def _list(value: Any, where: str, label: str) -> Sequence[Any]:
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: {label} must be a list, got {type(value).__name__}")
    return value


def _float_array(value: Any, where: str, label: str) -> np.ndarray:
    seq = _list(value, where, label)
    try:
        return np.asarray(seq, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        pass
    out = np.empty(len(seq), dtype=np.float64)
    for j, v in enumerate(seq):  # slow path only for lists with nulls or bad entries
        out[j] = _float(v, where, f"{label}[{j}]")
    return out


def _int_array(value: Any, where: str, label: str, vocab_size: int | None = None) -> np.ndarray:
    seq = _list(value, where, label)
    arr = np.asarray(seq)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        bad = next((j for j, v in enumerate(seq) if isinstance(v, bool) or not isinstance(v, (int, np.integer))), 0)
        raise ValueError(f"{where}: {label}[{bad}] must be an integer token id, got {seq[bad]!r}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        j = int(np.argmin(arr))
        raise ValueError(f"{where}: {label}[{j}] = {arr[j]} is negative")
    if vocab_size is not None and arr.size and arr.max() >= vocab_size:
        j = int(np.argmax(arr))
        raise ValueError(f"{where}: {label}[{j}] = {arr[j]} is outside the vocabulary (size {vocab_size})")
    return arr


def _correct(value: Any, where: str, label: str) -> bool | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (-1, 0, 1):
        return None if int(value) < 0 else bool(value)
    raise ValueError(f"{where}: {label} must be true, false, null, 1, 0 or -1, got {value!r}")


def convert_record(rec: Mapping[str, Any], where: str, *, kl_source: str, fields: FieldMap, top_n: int,
                   vocab_size: int | None = None) -> dict[str, Any]:
    """One record as store values: scalar columns (Python values) and per-token numpy arrays, after the
    loss mask. Raises ValueError naming ``where`` and the field for anything malformed."""
    for name in REQUIRED:
        if not fields.has(rec, name):
            raise ValueError(f"{where}: missing required {fields.label(name)}")
    out: dict[str, Any] = {}
    out["step"] = _int(fields.get(rec, "step"), where, fields.label("step"), minimum=0)
    pid = fields.get(rec, "prompt_id")
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise ValueError(f"{where}: {fields.label('prompt_id')} must be a string or an integer, got {pid!r}")
    out["prompt_id"] = str(pid)
    ids = _int_array(fields.get(rec, "token_ids"), where, fields.label("token_ids"), vocab_size)
    n = len(ids)

    per_token: dict[str, np.ndarray] = {"token_ids": ids}
    for name in FLOAT_TOKEN_FIELDS:
        if fields.has(rec, name):
            per_token[name] = _float_array(fields.get(rec, name), where, fields.label(name))
    if fields.has(rec, "loss_mask"):
        mask = _int_array(fields.get(rec, "loss_mask"), where, fields.label("loss_mask"))
        if mask.size and mask.max() > 1:
            raise ValueError(f"{where}: {fields.label('loss_mask')} must hold 0 or 1")
        per_token["loss_mask"] = mask
    text_tokens = None
    if fields.has(rec, "token_text"):
        text_tokens = list(_list(fields.get(rec, "token_text"), where, fields.label("token_text")))
        if not all(isinstance(t, str) for t in text_tokens):
            raise ValueError(f"{where}: {fields.label('token_text')} must be a list of strings")
    tops: dict[str, np.ndarray] = {}
    for name in TOP_COLUMNS:
        if fields.has(rec, name):
            seq = _list(fields.get(rec, name), where, fields.label(name))
            try:
                arr = np.asarray(seq, dtype=np.float64 if name == "teacher_top_probs" else np.int64)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {fields.label(name)} must be a list of {top_n}-lists of numbers") from None
            if arr.size == 0:
                arr = arr.reshape(0, top_n)
            if arr.ndim != 2 or arr.shape[1] != top_n:
                width = arr.shape[1] if arr.ndim == 2 else "ragged"
                raise ValueError(f"{where}: {fields.label(name)} has {width} entries per token; the store's "
                                 f"top_n is {top_n} (set it with the header's top_n or --top-n)")
            tops[name] = arr
    for name, arr in [*per_token.items(), *tops.items(), *([("token_text", text_tokens)] if text_tokens else [])]:
        if len(arr) != n:
            raise ValueError(f"{where}: {fields.label(name)} has {len(arr)} entries but "
                             f"{fields.label('token_ids')} has {n}")

    if "kl" not in per_token:
        s, t = per_token.get("student_logprob"), per_token.get("teacher_logprob")
        if kl_source == "full":
            hint = (" (the row has sampled-token log-probs only: pass --kl-source k1 or k3)"
                    if s is not None and t is not None else "")
            raise ValueError(f"{where}: missing {fields.label('kl')}, the full-vocabulary KL of kl_source full{hint}")
        if s is None or t is None:
            missing = fields.label("student_logprob") if s is None else fields.label("teacher_logprob")
            raise ValueError(f"{where}: missing {missing}: kl_source {kl_source} without {fields.label('kl')} "
                             "needs both student_logprob and teacher_logprob")
        per_token["kl"] = ESTIMATORS[kl_source](s, t)
    if "kl_sampled" not in per_token and "student_logprob" in per_token and "teacher_logprob" in per_token:
        per_token["kl_sampled"] = k1(per_token["student_logprob"], per_token["teacher_logprob"])

    mask = per_token.pop("loss_mask", None)
    if mask is not None:
        keep = mask.astype(bool)
        per_token = {k: v[keep] for k, v in per_token.items()}
        tops = {k: v[keep] for k, v in tops.items()}
        if text_tokens is not None:
            text_tokens = [t for t, k in zip(text_tokens, keep.tolist(), strict=True) if k]
    out.update(per_token)
    out.update(tops)
    if text_tokens is not None:
        out["token_text"] = text_tokens
    length = len(per_token["token_ids"])

    for name in ("rank", "rollout_id"):
        if fields.has(rec, name):
            out[name] = _int(fields.get(rec, name), where, fields.label(name), minimum=0)
    for name in ("onset", "fire", "kept_len", "first_error", "loop_start"):
        if fields.has(rec, name):
            out[name] = _int(fields.get(rec, name), where, fields.label(name), minimum=-1)
    if "kept_len" in out and not 0 <= out["kept_len"] <= length:
        raise ValueError(f"{where}: {fields.label('kept_len')} = {out['kept_len']} is outside [0, {length}] "
                         "(the number of stored tokens)")
    if fields.has(rec, "tau"):
        out["tau"] = _float(fields.get(rec, "tau"), where, fields.label("tau"))
    for name in ("policy", "stop_reason", "text", "verdict"):
        if fields.has(rec, name):
            value = fields.get(rec, name)
            if not isinstance(value, str):
                raise ValueError(f"{where}: {fields.label(name)} must be a string, got {value!r}")
            out[name] = value
    if "policy" not in out:
        out["policy"] = "kat" if any(fields.has(rec, k) for k in KAT_FIELDS) else "none"
    out["correct"] = _correct(fields.get(rec, "correct"), where, fields.label("correct"))
    return out


# --------------------------------------------------------------------------------------------------
# Import


def _resolve_kl_source(kl_source: str | None, header: dict[str, Any] | None) -> str:
    from_header = None if header is None else header.get("kl_source")
    if from_header is not None and from_header not in KL_SOURCES:
        raise ValueError(f"the file's header has kl_source {from_header!r}; expected one of {', '.join(KL_SOURCES)}")
    if kl_source is not None and kl_source not in KL_SOURCES:
        raise ValueError(f"--kl-source must be one of {', '.join(KL_SOURCES)}, got {kl_source!r}")
    if kl_source is not None and from_header is not None and kl_source != from_header:
        raise ValueError(f"--kl-source {kl_source} contradicts the file's header (kl_source {from_header})")
    return kl_source or from_header or "full"


class _Batcher:
    """Rows of one rank buffered into column lists for `TraceWriter.append`."""

    def __init__(self, writer: TraceWriter) -> None:
        self.writer = writer
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= _APPEND_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        names = set().union(*(r.keys() for r in rows)) - {"rank"}
        cols: dict[str, Any] = {}
        for name in names:
            if name in TOKEN_COLUMNS:
                cols[name] = [r.get(name, np.full(len(r["token_ids"]), np.nan)) for r in rows]
            elif name in TOP_COLUMNS:
                fill = -1 if name == "teacher_top_ids" else np.nan
                cols[name] = [r.get(name, np.full((len(r["token_ids"]), self.writer.top_n), fill)) for r in rows]
            elif name == "token_text":
                cols[name] = [r.get(name) for r in rows]
            else:
                default = {"tau": np.nan, "onset": -1, "fire": -1, "stop_reason": "eos", "text": "",
                           "correct": None, "first_error": None, "loop_start": None, "verdict": None}
                if name == "rollout_id" and any(name not in r for r in rows):
                    raise ValueError("rollout_id must be given for every row or for none")
                if name == "kept_len":
                    cols[name] = [r.get(name, len(r["token_ids"])) for r in rows]
                else:
                    cols[name] = [r.get(name, default.get(name)) for r in rows]
        self.writer.append(cols)


def import_file(path: str | os.PathLike[str], out: str | os.PathLike[str], *, kl_source: str | None = None,
                fields: Mapping[str, str] | None = None, top_n: int | None = None,
                config: dict[str, Any] | None = None, run_name: str | None = None, vocab_size: int | None = None,
                decode_tokens: Callable[[Sequence[int]], list[str]] | None = None,
                decode_text: Callable[[Sequence[int]], str] | None = None,
                wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> dict[str, Any]:
    """Import an interchange file (or directory) into the store ``OUT/traces``; returns a summary.

    ``kl_source``: None = the header's, else "full". ``fields``: format field -> the file's key.
    ``top_n``: None = the header's, else the width of the first row's teacher top-n, else 5.
    ``config``: the manifest config (None = the header's). ``vocab_size``: token ids must be below it.
    ``decode_tokens`` / ``decode_text``: fill ``token_text`` / ``text`` where rows lack them (e.g. from
    a tokenizer). ``wrap``: e.g. a progress bar around the row iterator. Whole or nothing: see the
    module docstring; ``OUT/traces`` must not exist.
    """
    out = Path(out)
    header = read_header(path)
    source = _resolve_kl_source(kl_source, header)
    fmap = FieldMap(fields)
    if config is None:
        config = dict((header or {}).get("config") or {})
    if run_name is None:
        run_name = (header or {}).get("run") or out.resolve().name
    stage = staging_dir(out)
    if stage.exists():
        shutil.rmtree(stage)  # left by an import that was killed: imports restart from the file
    records = iter_records(path)
    if wrap is not None:
        records = iter(wrap(records))
    first = next(records, None)
    if first is None:
        raise ValueError(f"{path}: no rows to import")
    n_top = top_n or (header or {}).get("top_n")
    if n_top is None:
        width = fmap.get(first[1], "teacher_top_ids")
        n_top = len(width[0]) if isinstance(width, (list, tuple)) and width and isinstance(width[0], (list, tuple)) \
            else DEFAULT_TOP_N
    n_top = int(n_top)
    writers: dict[int, _Batcher] = {}
    seen_ids: set[int] = set()
    present: set[str] = set()
    n_rows = n_tokens = 0
    try:
        for where, rec in _chain(first, records):
            row = convert_record(rec, where, kl_source=source, fields=fmap, top_n=n_top, vocab_size=vocab_size)
            if "rollout_id" in row:
                if row["rollout_id"] in seen_ids:
                    raise ValueError(f"{where}: {fmap.label('rollout_id')} {row['rollout_id']} appears twice")
                seen_ids.add(row["rollout_id"])
            if decode_tokens is not None and "token_text" not in row:
                row["token_text"] = decode_tokens(row["token_ids"].tolist())
            if decode_text is not None and "text" not in row:
                row["text"] = decode_text(row["token_ids"].tolist())
            present.update(row)
            rank = row.get("rank", 0)
            if rank not in writers:
                writers[rank] = _Batcher(TraceWriter(stage, rank=rank, run_name=run_name, config=config,
                                                     top_n=n_top, kl_source=source))
            try:
                writers[rank].add(row)
            except ValueError as e:
                raise ValueError(f"{where} (or a row before it): {e}") from None
            n_rows += 1
            n_tokens += len(row["token_ids"])
        for b in writers.values():
            b.flush()
            b.writer.close()
        # per-token columns no row had: they read as NaN / -1 / null, and analyses that need them refuse
        absent = [c for c in (*TOKEN_COLUMNS, *TOP_COLUMNS, "token_text") if c not in present]
        update_manifest(stage, absent_columns=absent,
                        imported={"from": str(path), "format_version": FORMAT_VERSION, "fields": fmap.map})
        store = publish_staged(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {"store": str(store), "rollouts": n_rows, "tokens": n_tokens, "kl_source": source, "top_n": n_top,
            "absent_columns": absent}


def _chain(first: tuple[str, dict[str, Any]], rest: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[Any]:
    yield first
    yield from rest


# --------------------------------------------------------------------------------------------------
# Export


def _floats_json(values: np.ndarray) -> list[float | None]:
    arr = np.asarray(values, dtype=np.float64)
    out = arr.tolist()
    if not np.isfinite(arr).all():  # JSON has no NaN / inf: null (inf is never stored by kat-diag)
        out = [v if np.isfinite(v) else None for v in out]
    return out


def _row_json(b: Any, i: int, columns: Sequence[str]) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for c in columns:
        v = b[c]
        if c in TOKEN_COLUMNS and c != "token_ids":
            rec[c] = _floats_json(v[i])
        elif c in ("token_ids", "teacher_top_ids"):
            rec[c] = v[i].tolist()
        elif c == "teacher_top_probs":
            rec[c] = [_floats_json(r) for r in v[i]] if len(v[i]) else []
        elif c == "token_text":
            t = v[i]
            if len(t) or b["gen_len"][i] == 0:
                rec[c] = [str(s) for s in t]
        elif c == "correct":
            rec[c] = None if v[i] < 0 else bool(v[i])
        elif c in ("first_error", "loop_start"):
            rec[c] = None if v[i] == UNKNOWN_POSITION else int(v[i])
        elif c == "tau":
            rec[c] = None if not np.isfinite(v[i]) else float(v[i])
        else:
            x = v[i]
            rec[c] = x.item() if isinstance(x, np.generic) else x
    return rec


EXPORT_SCALARS: tuple[str, ...] = tuple(c for c in SCALAR_COLUMNS if c not in ("run", "gen_len"))


def export_store(reader: TraceReader, path: str | os.PathLike[str], *,
                 wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> dict[str, Any]:
    """Write every rollout of ``reader`` to ``path`` in the interchange format (``.jsonl`` or ``.parquet``
    by suffix), header first, columns the store never received left out. Written to a temporary name
    and renamed, so ``path`` is complete or absent. Returns a summary."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: export writes .jsonl or .parquet, got {suffix!r}")
    absent = set(reader.absent_columns)
    columns = [c for c in (*EXPORT_SCALARS, *TOKEN_COLUMNS, *TOP_COLUMNS, "token_text") if c not in absent]
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kl_source": reader.kl_source,
              "top_n": reader.top_n, "run": reader.manifest.get("run"), "config": reader.config}
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    n_rows = n_tokens = 0
    batches: Iterable[Any] = reader.iter_batches(list(dict.fromkeys([*columns, "gen_len"])))
    if wrap is not None:
        batches = wrap(batches)
    try:
        if suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                f.write(json.dumps(header, allow_nan=False, default=str) + "\n")
                for b in batches:
                    for i in range(b.num_rows):
                        f.write(json.dumps(_row_json(b, i, columns), allow_nan=False, ensure_ascii=False) + "\n")
                    n_rows += b.num_rows
                    n_tokens += int(b["gen_len"].sum())
        else:
            n_rows, n_tokens = _export_parquet(batches, tmp, columns, header, reader.top_n)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": str(path), "rollouts": n_rows, "tokens": n_tokens, "kl_source": reader.kl_source,
            "columns": columns}


def _export_parquet(batches: Iterable[Any], tmp: Path, columns: Sequence[str], header: dict[str, Any],
                    top_n: int) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kat_diag.traces.schema import _SCALAR_TYPES, _TOKEN_DTYPES

    fields = []
    for c in columns:
        if c in _SCALAR_TYPES:
            fields.append(pa.field(c, _SCALAR_TYPES[c]))
        elif c in TOP_COLUMNS:
            fields.append(pa.field(c, pa.list_(pa.list_(pa.from_numpy_dtype(_TOKEN_DTYPES[c])))))
        elif c == "token_text":
            fields.append(pa.field(c, pa.list_(pa.string())))
        else:
            fields.append(pa.field(c, pa.list_(pa.from_numpy_dtype(_TOKEN_DTYPES[c]))))
    schema = pa.schema(fields, metadata={PARQUET_META_KEY: json.dumps(header, default=str).encode()})
    n_rows = n_tokens = 0
    with pq.ParquetWriter(tmp, schema) as w:
        for b in batches:
            arrays = []
            offsets = pa.array(np.concatenate([[0], np.cumsum(b["gen_len"])]).astype(np.int32))
            for fld in schema:
                c, v = fld.name, b[fld.name]
                if c in TOKEN_COLUMNS:
                    arrays.append(pa.ListArray.from_arrays(offsets, pa.array(v.values)))
                elif c in TOP_COLUMNS:
                    inner_off = pa.array(np.arange(0, v.values.size + 1, top_n, dtype=np.int32))
                    inner = pa.ListArray.from_arrays(inner_off, pa.array(v.values.reshape(-1)))
                    arrays.append(pa.ListArray.from_arrays(offsets, inner))
                elif c == "token_text":
                    rows = [[str(s) for s in v[i]] if (len(v[i]) or b["gen_len"][i] == 0) else None
                            for i in range(b.num_rows)]
                    arrays.append(pa.array(rows, fld.type))
                elif c == "correct":
                    arrays.append(pa.array([None if x < 0 else bool(x) for x in v.tolist()], pa.bool_()))
                elif c in ("first_error", "loop_start"):
                    arrays.append(pa.array([None if x == UNKNOWN_POSITION else x for x in v.tolist()], pa.int32()))
                else:
                    arrays.append(pa.array(v.tolist() if v.dtype == object else v, fld.type))
            w.write_table(pa.Table.from_arrays(arrays, schema=schema))
            n_rows += b.num_rows
            n_tokens += int(b["gen_len"].sum())
    return n_rows, n_tokens
