"""Old module paths (kat-diag 0.1, before the subpackages) keep importing, with a DeprecationWarning.

`import kat_diag.trainer` or `from kat_diag.detector import KATConfig` in a user's script still
works for one release: a finder on `sys.meta_path` answers each old name with a module that holds
the public names of the new modules it was split into. New code imports the new paths (docs/api.md).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> the modules its contents now live in (first match wins for a name)
MOVED: dict[str, tuple[str, ...]] = {
    "kat_diag.checkpoint": ("kat_diag.opd.checkpoint",),
    "kat_diag.config_io": ("kat_diag.run.config_io",),
    "kat_diag.detector": ("kat_diag.kat.detector", "kat_diag.kat.config"),
    "kat_diag.distributed": ("kat_diag.opd.distributed",),
    "kat_diag.fsdp": ("kat_diag.opd.fsdp",),
    "kat_diag.kvcache": ("kat_diag.opd.kvcache",),
    "kat_diag.loop_probe": ("kat_diag.world.loop_probe",),
    "kat_diag.loss": ("kat_diag.opd.loss",),
    "kat_diag.plan": ("kat_diag.opd.plan",),
    "kat_diag.preflight": ("kat_diag.run.preflight", "kat_diag.opd.preflight", "kat_diag.world.paths",
                           "kat_diag.data.sources"),
    "kat_diag.progress": ("kat_diag.run.progress",),
    "kat_diag.record": ("kat_diag.opd.record",),
    "kat_diag.rollout": ("kat_diag.opd.rollout", "kat_diag.opd.config"),
    "kat_diag.rundir": ("kat_diag.run.rundir",),
    "kat_diag.sft": ("kat_diag.world.sft",),
    "kat_diag.supervise": ("kat_diag.opd.supervise",),
    "kat_diag.tasks": ("kat_diag.world.tasks", "kat_diag.data.problems", "kat_diag.data.sources",
                       "kat_diag.data.grading"),
    "kat_diag.termination": ("kat_diag.kat.policies",),
    "kat_diag.tokenizer": ("kat_diag.world.tokenizer",),
    "kat_diag.trace_view": ("kat_diag.views.summary", "kat_diag.views.rollout", "kat_diag.views.terminal",
                            "kat_diag.views.html", "kat_diag.views.colors", "kat_diag.views.text"),
    "kat_diag.tracking": ("kat_diag.opd.tracking",),
    "kat_diag.trainer": ("kat_diag.opd.trainer", "kat_diag.opd.config", "kat_diag.opd.checkpoint"),
    "kat_diag.truth": ("kat_diag.world.truth",),
    "kat_diag.analysis.phases": ("kat_diag.kat.phases",),
}


class _Loader(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]) -> None:
        self.targets = targets

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return types.ModuleType(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        warnings.warn(f"{module.__name__} moved to {' / '.join(self.targets)}; the old path goes away in 0.3",
                      DeprecationWarning, stacklevel=2)
        for target in reversed(self.targets):  # earlier targets win on a shared name
            new = importlib.import_module(target)
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        targets = MOVED.get(name)
        return None if targets is None else importlib.util.spec_from_loader(name, _Loader(targets))


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
