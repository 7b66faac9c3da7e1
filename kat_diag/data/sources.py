"""Data sources: real math data sets from local JSONL / Parquet, `datasets` directories or `hf:` names.

A field mapping (`question_field`, `answer_field`, `answer_format`) turns any record layout into
`Problem`s; a world data file is read as the world's own problems, ground truth included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kat_diag.data.grading import extract_boxed, extract_gsm8k_answer
from kat_diag.data.problems import Problem, is_problem_record

HF_PREFIX = "hf:"


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG]:SPLIT` -> (name, config or None, split)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not spec.startswith(HF_PREFIX) or len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--data {spec!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
                         "(e.g. hf:openai/gsm8k:main:train)")
    return (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def is_datasets_dir(path: str | Path) -> bool:
    """A directory written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk`."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def _read_hf_dataset(spec: str) -> list[dict]:
    """`hf:NAME[:CONFIG]:SPLIT` through `datasets.load_dataset` (the local cache when offline)."""
    name, config, split = parse_hf_spec(spec)
    datasets = _import_datasets(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name or split: the hub client raises many types
        import os

        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else str(e).splitlines()[0]
        raise ValueError(f"--data {spec!r}: cannot load {name!r} ({why}); pass a local path instead "
                         "(a save_to_disk directory, JSONL or Parquet)") from e
    return ds.to_list()


def _import_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {source!r} needs the `datasets` package: pip install 'kat-diag[data]'") from None
    return datasets


def _read_disk_dataset(path: Path) -> list[dict]:
    """A directory written by `datasets.Dataset.save_to_disk`."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise ValueError(f"{path}: a DatasetDict; pass one split's directory, e.g. {path / (splits or ['train'])[0]}")
    ds = _import_datasets(str(path)).load_from_disk(str(path))
    return ds.to_list()


def _utf8_lines(path: Path, what: str) -> Iterable[str]:
    """The lines of a text file; a line that is not UTF-8 is a ValueError naming `what` and the line
    (the codec's own message names neither file nor line)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{what}: line {lineno} is not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                                 "save the file as UTF-8") from None


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        if not is_datasets_dir(path):
            raise ValueError(f"{path}: a directory but not a datasets save_to_disk directory (no state.json)")
        return _read_disk_dataset(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        for lineno, line in enumerate(_utf8_lines(path, str(path)), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        return records
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported data format {suffix!r} (use .jsonl, .parquet, a datasets directory "
                     "or hf:NAME:CONFIG:SPLIT)")


def load_math_dataset(
    path: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_format: str = "auto",
    id_field: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load a real math set with a field mapping, from local JSONL/Parquet, a directory written by
    `datasets.Dataset.save_to_disk`, or `hf:NAME[:CONFIG]:SPLIT` (loaded by `datasets`).

    answer_format: "gsm8k" (`#### 42` inside the answer field), "boxed" (MATH-style `\\boxed{}`
    inside a solution field), "plain" (the field is the answer), or "auto" (try gsm8k, boxed, plain).
    """
    if answer_format not in ("auto", "gsm8k", "boxed", "plain"):
        raise ValueError(f"answer_format must be auto|gsm8k|boxed|plain, got {answer_format!r}")
    if str(path).startswith(HF_PREFIX):
        records = _read_hf_dataset(str(path))
        path = Path(str(path)[len(HF_PREFIX):].split(":")[0].replace("/", "_"))  # ids and messages name it
    else:
        path = Path(path)
        records = _read_records(path)
    if not records:
        raise ValueError(f"{path}: the data set is empty")
    if question_field not in records[0] and is_problem_record(records[0]):
        # a world data file (`write_jsonl`): keep its kind and solution, hence its ground truth
        return [Problem.from_json(r) for r in (records[:limit] if limit else records)]
    problems = []
    for i, rec in enumerate(records[:limit] if limit else records):
        for field in (question_field, answer_field) + ((id_field,) if id_field else ()):
            if field not in rec:
                raise KeyError(
                    f"{path}: record {i} has no field {field!r} (fields: {sorted(rec)}); "
                    f"set the field mapping"
                )
        raw = str(rec[answer_field])
        ans = None
        if answer_format in ("auto", "gsm8k"):
            ans = extract_gsm8k_answer(raw)
        if ans is None and answer_format in ("auto", "boxed"):
            ans = extract_boxed(raw)
        if ans is None and answer_format in ("auto", "plain"):
            ans = raw.strip()
        if ans is None or ans == "":
            raise ValueError(
                f"{path}: record {i}: no {answer_format} answer found in field {answer_field!r}"
            )
        pid = str(rec[id_field]) if id_field else f"{path.stem}-{i}"
        problems.append(
            Problem(id=pid, prompt=str(rec[question_field]), answer=ans, solution=raw, kind="math")
        )
    return problems


def check_data_file(option: str, path: str | Path, fields: Iterable[str] = ()) -> None:
    """The file exists, has a supported format, and its first record has the mapped fields."""
    from kat_diag.data.problems import is_problem_record
    from kat_diag.data.sources import HF_PREFIX, is_datasets_dir, parse_hf_spec

    if str(path).startswith(HF_PREFIX):  # loaded by `datasets` later (an offline miss is its own one-line error)
        parse_hf_spec(str(path))
        return
    if is_datasets_dir(path):  # a save_to_disk directory: fields are checked when it loads
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {p}: is a directory, but not a datasets save_to_disk directory "
                         "(no state.json); pass a .jsonl or .parquet file")
    if not p.is_file():
        raise FileNotFoundError(f"{option} {p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{option} {p}: unsupported format {suffix!r} (use .jsonl or .parquet)")
    first: Any = None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(p).names
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise ValueError(f"{option} {p}: not a readable Parquet file ({e})") from e
        first = dict.fromkeys(names)
    else:
        for lineno, line in enumerate(_utf8_lines(p, f"{option} {p}"), 1):
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{option} {p}:{lineno}: invalid JSON ({e.msg})") from e
                break
    if first is None:
        raise ValueError(f"{option} {p}: the data set is empty")
    if not isinstance(first, dict):
        raise ValueError(f"{option} {p}: records must be JSON objects")
    if is_problem_record(first):
        return  # a world data file (tasks.write_jsonl): read as the world's problems
    for name in fields:
        if name not in first:
            raise KeyError(f"{option} {p}: records have no field {name!r} (fields: {sorted(first)}); "
                           "set --question-field / --answer-field")
