"""Writing an analysis's outputs: the PNG, the numbers beside it (CSV / Parquet), JSON-ready dicts.

Every analysis command writes ``NAME.png`` and the numbers behind it next to it, so a figure can be
redrawn or checked without recomputing it; these helpers keep the file formats the same everywhere.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, NaN and inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, np.generic):
        return clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Rows of dicts as CSV (columns: the first row's keys); NaN written as an empty cell."""
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if not rows:
            return path
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                        for k, v in clean(r).items()})
    return path


def write_parquet(path: Path, columns: Mapping[str, Any]) -> Path:
    """Columns (numpy arrays or lists, lists of arrays for list columns) as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array([np.asarray(x).tolist() for x in v]) if isinstance(v, list) else pa.array(v)
                      for k, v in columns.items()})
    pq.write_table(table, path)
    return path


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of a nested dict/list as ``{"a.b.0": value}`` (for summary tables)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and all(isinstance(v, Mapping) for v in obj) and obj:
        for i, v in enumerate(obj):
            name = v.get("stage") or v.get("name") or v.get("run") or str(i)
            out.update(flatten(v, f"{prefix}{name}."))
    elif isinstance(obj, (list, tuple)):
        out[prefix[:-1]] = ", ".join(str(x) for x in obj)
    else:
        out[prefix[:-1]] = obj
    return out


def shown_path(path: Any) -> str:
    """A path as written into results: relative to the current directory when it lies inside it, so
    committed files never name the machine they were made on (`/work/...`)."""
    from pathlib import Path

    p = Path(str(path))
    if p.is_absolute():
        try:
            return str(p.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(p)
    return str(p)
