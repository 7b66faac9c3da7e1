"""The per-token trace store: Parquet files of rollouts, written crash-safe, read lazily.

Every analysis reads per-token KL traces offline, without the models, from `RUN/traces/`. Modules:
`schema` (columns, types, version, rollout ids, the manifest), `ragged` (`Ragged`, `TraceBatch`: the
form readers return), `writer` (`TraceWriter`: append-only, crash-safe), `reader` (`TraceReader`:
footers first, row group by row group, filtered). The names below are re-exported here so that
`from kat_diag.traces import TraceReader` works.

May import: nothing else of kat_diag (a bottom layer: the trainer, the method and the analyses all
read or write stores; the store knows none of them).
"""

from kat_diag.traces.ragged import Ragged, TraceBatch
from kat_diag.traces.reader import TraceFilter, TraceReader
from kat_diag.traces.schema import (
    ALL_COLUMNS,
    DEFAULT_KL_SOURCE,
    DEFAULT_TOP_N,
    KL_SOURCE_LABELS,
    KL_SOURCES,
    MANIFEST_NAME,
    RAGGED_COLUMNS,
    SCALAR_COLUMNS,
    SCHEMA_VERSION,
    TEXT_COLUMN,
    TOKEN_COLUMNS,
    TOP_COLUMNS,
    TRACES_DIRNAME,
    TRUTH_COLUMNS,
    UNKNOWN_POSITION,
    TraceStoreError,
    kl_source_of,
    make_rollout_id,
    read_manifest,
    schema,
    split_rollout_id,
)
from kat_diag.traces.writer import TraceWriter

__all__ = [
    "ALL_COLUMNS", "DEFAULT_KL_SOURCE", "DEFAULT_TOP_N", "KL_SOURCES", "KL_SOURCE_LABELS", "MANIFEST_NAME",
    "RAGGED_COLUMNS", "SCALAR_COLUMNS", "SCHEMA_VERSION", "TEXT_COLUMN", "TOKEN_COLUMNS", "TOP_COLUMNS",
    "TRACES_DIRNAME", "TRUTH_COLUMNS", "UNKNOWN_POSITION", "Ragged", "TraceBatch", "TraceFilter", "TraceReader",
    "TraceStoreError", "TraceWriter", "kl_source_of", "make_rollout_id", "read_manifest", "schema",
    "split_rollout_id",
]
