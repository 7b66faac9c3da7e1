"""KAT and kat-diag traces inside TRL (`pip install "kat-diag[trl]"`, TRL >= 1.10, < 2).

    from kat_diag.integrations.trl import KATDistillationTrainer

Modules: `trainer` (`KATDistillationTrainer`, a `trl.DistillationTrainer` subclass: online and post-hoc
KAT, every kat-diag termination policy, traces, checkpointed policy state), `batch` (TRL's generation
batch as rollouts and back: post-hoc decisions, training spans written into TRL's masks). docs/trl.md
says what each mode costs and saves.
"""

from __future__ import annotations

try:
    import trl as _trl  # noqa: F401
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError('kat_diag.integrations.trl needs TRL: pip install "kat-diag[trl]" (trl>=1.10,<2)') from e

from kat_diag.integrations.trl.trainer import KATDistillationTrainer

__all__ = ["KATDistillationTrainer"]
