"""Ragged per-token arrays and batches of rollouts: the form every analysis reads.

A store holds rollouts of different lengths; `Ragged(offsets, values)` keeps them as one flat array
plus offsets (rollout i is `values[offsets[i]:offsets[i+1]]`), so analyses stay vectorised, and
`TraceBatch` maps column names to numpy scalars or `Ragged` columns for n rollouts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kat_diag.traces.schema import _SCALAR_TYPES, _STRING_SCALARS, _TOKEN_DTYPES, RAGGED_COLUMNS

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

    String columns are numpy object arrays of ``str``; ``correct`` is int8 with -1 = not graded;
    ``first_error`` / ``loop_start`` are int32 with ``UNKNOWN_POSITION`` (-2) = no ground truth, and
    ``verdict`` holds None there.
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
