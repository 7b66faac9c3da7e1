"""kat-diag: on-policy distillation with KAT and diagnostics of the KL agreement trap.

The public API, importable from here (each name loads its module on first use, so `import kat_diag`
stays light):

    KATConfig, kat_preset, KAT_PRESETS      KAT's parameters and presets      (kat_diag.kat.config)
    make_policy                              termination policies              (kat_diag.kat.policies)
    replay, segment, PHASE_NAMES             offline detector and phases       (kat_diag.kat.replay / .phases)
    TrainConfig, SamplingConfig, train       the OPD trainer                   (kat_diag.opd.config / .trainer)
    RecordConfig, record                     traces without training           (kat_diag.opd.record)
    TraceReader, TraceWriter, Ragged         the trace store                   (kat_diag.traces)
    trap_report                              the trap in a store               (kat_diag.analysis.trap)
    avg_at_k, pass_at_k                      evaluation                        (kat_diag.evaluation)
    load_model, load_tokenizer               Hugging Face checkpoints          (kat_diag.models)
    StudyConfig, run_study                   the paper's comparison            (kat_diag.study)

Layout (each subpackage's docstring says what it may import; tests/test_layout.py enforces it):
`run` and `data` and `traces` at the bottom, then `kat` (the method) and `world`, `views`, `opd`
(the trainer), `analysis`, and at the top `study` and `integrations`. The CLI (`cli/`) is a thin
Typer layer over this package.
"""

from __future__ import annotations

from typing import Any

from kat_diag import _moved

__version__ = "0.1.0"

_API = {
    "KATConfig": "kat_diag.kat.config", "kat_preset": "kat_diag.kat.config", "KAT_PRESETS": "kat_diag.kat.config",
    "make_policy": "kat_diag.kat.policies",
    "replay": "kat_diag.kat.replay", "segment": "kat_diag.kat.phases", "PHASE_NAMES": "kat_diag.kat.phases",
    "TrainConfig": "kat_diag.opd.config", "SamplingConfig": "kat_diag.opd.config", "train": "kat_diag.opd.trainer",
    "RecordConfig": "kat_diag.opd.record", "record": "kat_diag.opd.record",
    "TraceReader": "kat_diag.traces", "TraceWriter": "kat_diag.traces", "Ragged": "kat_diag.traces",
    "trap_report": "kat_diag.analysis.trap",
    "avg_at_k": "kat_diag.evaluation", "pass_at_k": "kat_diag.evaluation",
    "load_model": "kat_diag.models", "load_tokenizer": "kat_diag.models",
    "StudyConfig": "kat_diag.study", "run_study": "kat_diag.study",
}
__all__ = ["__version__", *_API]

_moved.install()


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kat_diag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
