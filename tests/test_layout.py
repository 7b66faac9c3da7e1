"""The package layout: imports point one way, no circles, and the old module paths still import.

Every import in kat_diag (top-level or inside a function: a lazy import is still a dependency) is
read with `ast`. A module belongs to a unit: its subpackage (`kat_diag.opd`), or itself for the few
top-level modules. LAYERS says which units each unit may import; the test fails when an import points
another way (e.g. the trace store importing an analysis) or when the module graph has a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "kat_diag"

# unit -> the units it may import (besides itself). Mirrors the subpackages' docstrings.
LAYERS: dict[str, set[str]] = {
    "run": set(),
    "data": set(),
    "traces": set(),
    "models": set(),
    "kat": {"traces"},
    "world": {"data", "models", "run"},
    "evaluation": {"data", "run"},
    "views": {"traces", "kat", "data", "world", "run"},
    "opd": {"kat", "traces", "data", "world", "views", "models", "evaluation", "run"},
    "analysis": {"kat", "traces", "views", "opd", "models", "data", "world", "evaluation", "run"},
    "study": {"analysis", "opd", "kat", "traces", "views", "models", "data", "world", "evaluation", "run"},
    "integrations": {"analysis", "opd", "kat", "traces", "views", "models", "data", "world", "evaluation", "run"},
    # the package root: version, public API names and the moved-module table (names only, loaded lazily)
    "__init__": {"_moved"},
    "_moved": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """Every kat_diag module imported anywhere in the file (names of `from pkg import mod` resolved)."""
    me = module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kat_diag")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = me.split(".")[: len(me.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(pkg + ([base] if base else []))
            if not base.startswith("kat_diag"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else base)
    out.discard(me)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_unit_is_declared():
    units = {unit_of(m) for m in graph()}
    assert units <= set(LAYERS), f"undeclared units: {sorted(units - set(LAYERS))}; add them to LAYERS"


def test_imports_point_one_way():
    bad = []
    for mod, deps in graph().items():
        unit = unit_of(mod)
        for dep in deps:
            target = unit_of(dep)
            if target != unit and target not in LAYERS[unit] and dep != "kat_diag":
                bad.append(f"{mod} imports {dep} ({unit} -> {target})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_the_layers_themselves_have_no_cycle():
    seen: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        if seen.get(u) == 1:
            raise AssertionError(f"cycle in LAYERS: {' -> '.join(path + [u])}")
        if seen.get(u) == 2:
            return
        seen[u] = 1
        for v in LAYERS[u]:
            visit(v, path + [u])
        seen[u] = 2

    for u in LAYERS:
        visit(u, [])


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle_between_modules():
    g = {m: {d for d in deps if d != "kat_diag"} for m, deps in graph().items()}
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_a_wrong_way_import_and_a_cycle():
    # the checks themselves can fail: a store importing an analysis, and a two-module circle
    assert "analysis" not in LAYERS["traces"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_cli_entry_point_imports_no_heavy_library():
    code = "import sys, cli.main; print(' '.join(m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing cli.main loads {out.stdout.strip()}"


@pytest.mark.parametrize("old, name, new", [
    ("kat_diag.detector", "KATConfig", "kat_diag.kat.config"),
    ("kat_diag.detector", "StreamingDetector", "kat_diag.kat.detector"),
    ("kat_diag.trainer", "TrainConfig", "kat_diag.opd.config"),
    ("kat_diag.trainer", "train", "kat_diag.opd.trainer"),
    ("kat_diag.termination", "make_policy", "kat_diag.kat.policies"),
    ("kat_diag.tasks", "check_answer", "kat_diag.data.grading"),
    ("kat_diag.tasks", "make_problem", "kat_diag.world.tasks"),
    ("kat_diag.trace_view", "render_html", "kat_diag.views.html"),
    ("kat_diag.analysis.phases", "segment", "kat_diag.kat.phases"),
])
def test_old_module_paths_still_import_with_a_deprecation_warning(old, name, new):
    import importlib

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_public_api_names_resolve():
    import kat_diag

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in kat_diag.__all__:
            assert getattr(kat_diag, name) is not None
    assert kat_diag.kat_preset("paper").window == 64
    with pytest.warns(DeprecationWarning):
        from kat_diag.world import DEFAULT_WORLD_DIR
    assert DEFAULT_WORLD_DIR.name == "world"
