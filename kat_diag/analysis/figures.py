"""Every figure of one or more runs in one folder, with a `summary.md` that embeds them with their numbers.

`kat-diag figures RUN [RUN ...] --out DIR` is what `make figures` runs for the README. Training
curves are drawn once with all runs overlaid; every per-run analysis is an entry of `REGISTRY`
(name -> function(run_dir, out_dir) that writes ``NAME.png`` plus its data and returns its numbers,
and a check that says why the run lacks the inputs it needs). With one run the per-run figures go
straight into DIR, with several into ``DIR/<run name>/``. An analysis whose inputs are missing is
skipped with its reason in the summary; an analysis that fails is reported, the others still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Analysis:
    """One per-run figure: ``run(run_dir, out_dir) -> numbers`` and ``missing(run_dir) -> reason | None``."""

    name: str
    title: str
    run: Callable[[Path, Path], dict[str, Any]]
    missing: Callable[[Path], str | None]


def _no_traces(run_dir: Path) -> str | None:
    from kat_diag.traces.reader import TraceReader
    from kat_diag.traces.schema import TraceStoreError

    try:
        if TraceReader(run_dir).num_rows == 0:
            return "the trace store is empty"
    except TraceStoreError as e:
        return f"no readable trace store ({e})"
    return None


def _heatmap(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    from kat_diag.analysis.heatmap import run_heatmap

    return run_heatmap(run_dir, out_dir)


def _phases(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    from kat_diag.analysis.phase_stats import run_phases

    return run_phases(run_dir, out_dir)


def _phase_tau(run_dir: Path) -> str:
    """tau for gradproj / vocab: each rollout's recorded threshold when the run recorded any (a KAT
    run), else the run's tau quantile of the store's rollout minima (plain OPD: no tau recorded)."""
    from kat_diag.analysis.phase_sample import kat_config_of, run_config
    from kat_diag.traces.reader import TraceReader

    taus = TraceReader(run_dir).read(["tau"])["tau"]
    if np.isfinite(np.asarray(taus, dtype=np.float64)).any():
        return "recorded"
    return f"q{kat_config_of(run_config(run_dir)).tau_quantile}"


def _needs_checkpoints(run_dir: Path) -> str | None:
    if (run_dir / "final").is_dir() or any((run_dir / "checkpoints").glob("step-*")):
        return _no_traces(run_dir)
    return "no final/ or checkpoints/step-*/ (gradient geometry needs the trained student)"


def _gradproj(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    from kat_diag.analysis.gradproj import run_gradproj

    return run_gradproj(run_dir, out_dir, tau=_phase_tau(run_dir))


def _vocab(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    from kat_diag.analysis.vocab import run_vocab

    return run_vocab(run_dir, out_dir, tau=_phase_tau(run_dir))


REGISTRY: dict[str, Analysis] = {
    "heatmap": Analysis("heatmap", "KL dynamics heatmap", _heatmap, _no_traces),
    "phases": Analysis("phases", "Phases and the heatmap findings", _phases, _no_traces),
    "gradproj": Analysis("gradproj", "Gradient geometry per phase", _gradproj, _needs_checkpoints),
    "vocab": Analysis("vocab", "Teacher vocabulary shift per phase", _vocab, _no_traces),
}


def _numbers_table(numbers: dict[str, Any], limit: int = 80) -> list[str]:
    from kat_diag.analysis.output import flatten

    flat = {k: v for k, v in flatten({k: v for k, v in numbers.items() if k != "files"}).items()}
    lines = ["| quantity | value |", "|---|---|"]
    for k, v in list(flat.items())[:limit]:
        val = f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v))
        lines.append(f"| `{k}` | {val} |")
    if len(flat) > limit:
        lines.append(f"| … | {len(flat) - limit} more in the data files |")
    return lines


def make_figures(run_dirs: Sequence[str | Path], out_dir: str | Path, *, analyses: Sequence[str] | None = None,
                 curves: bool = True) -> dict[str, Any]:
    """Write all figures of these runs into ``out_dir`` and ``out_dir/summary.md``; returns what was done
    (per analysis: numbers, seconds, or the reason it was skipped / the error it raised)."""
    from kat_diag.analysis.curves import run_curves, unique_names

    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise ValueError("figures needs at least one run directory")
    for r in runs:
        if not r.is_dir():
            raise FileNotFoundError(f"run directory {r} does not exist")
        if not (r / "metrics.jsonl").is_file() and not (r / "traces").is_dir() and not any(r.glob("part-*.parquet")):
            raise ValueError(f"{r}: not a run directory (no metrics.jsonl and no traces/ store): nothing to draw")
    names = analyses if analyses is not None else list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"--only: unknown analyses {unknown}; known: {sorted(REGISTRY)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = unique_names(runs)
    done: dict[str, Any] = {"out": str(out), "runs": [str(r) for r in runs], "analyses": {}}
    md = ["# kat-diag figures", "", "Runs: " + ", ".join(f"`{r}`" for r in runs), ""]

    if curves:
        t0 = time.perf_counter()
        try:
            res = run_curves(runs, out, labels)
            done["curves"] = {**res, "seconds": time.perf_counter() - t0}
            md += ["## Training curves", "", "![training curves](curves.png)", "", "Data: `curves.csv`.", ""]
            for run in res["runs"]:
                md += [f"**{run['run']}**", "", *_numbers_table(run), ""]
        except FileNotFoundError as e:
            done["curves"] = {"skipped": str(e)}
            md += ["## Training curves", "", f"Skipped: {e}", ""]

    for run, label in zip(runs, labels, strict=True):
        sub = out if len(runs) == 1 else out / label
        rel = "" if len(runs) == 1 else f"{label}/"
        per: dict[str, Any] = {}
        for name in names:
            a = REGISTRY[name]
            md += [f"## {a.title}: `{label}`", ""]
            reason = a.missing(run)
            if reason is not None:
                per[name] = {"skipped": reason}
                md += [f"Skipped: {reason}.", ""]
                continue
            t0 = time.perf_counter()
            try:
                numbers = a.run(run, sub)
            except Exception as e:  # one failing analysis must not lose the others' figures
                per[name] = {"error": f"{type(e).__name__}: {e}"}
                md += [f"Failed: `{type(e).__name__}: {e}`.", ""]
                continue
            per[name] = {**numbers, "seconds": time.perf_counter() - t0}
            files = [Path(f).name for f in numbers.get("files", [])]
            pngs = [f for f in files if f.endswith(".png")]
            md += [f"![{a.title}]({rel}{p})" for p in pngs] + [""]
            md += ["Data: " + ", ".join(f"`{rel}{f}`" for f in files if not f.endswith(".png")), ""]
            md += [*_numbers_table(numbers), ""]
        done["analyses"][label] = per
    (out / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    done["summary"] = str(out / "summary.md")
    return done
