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
    from kat_diag.analysis.gradproj import trained_checkpoints

    if trained_checkpoints(run_dir):
        return _no_traces(run_dir)
    return "no final/, checkpoints/step-*/ or checkpoint-N/ (gradient geometry needs the trained student)"


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


def _files(numbers: dict[str, Any]) -> list[str]:
    """The written files of an analysis (a list, or a dict name -> path), as paths."""
    f = numbers.get("files", [])
    return [str(v) for v in (f.values() if isinstance(f, dict) else f)]


def _pct(v: Any) -> str:
    return "-" if v is None or not isinstance(v, (int, float)) or v != v else f"{100 * v:.0f} %"


def _num(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None or not isinstance(v, (int, float)) or v != v else format(v, fmt)


def _ci(lo: Any, hi: Any, fmt: str = ".3g") -> str:
    return "" if lo is None or hi is None or lo != lo else f" [{lo:{fmt}}, {hi:{fmt}}]"


def caption(name: str, n: dict[str, Any]) -> str:
    """One line: what the figure shows, with its main numbers."""
    try:
        if name == "heatmap":
            parts = [f"{s['stage']} (steps {s['steps'][0]}-{s['steps'][1]}): {_pct(s['extended_low_kl_share'])} of "
                     "rollouts hold an extended low-KL segment, median start "
                     f"{_num(s['first_segment_median_start'], '.0f')}" for s in n["stages"]]
            return ("Rollouts x token position, KL colour (bright = agreement), rows by verdict then onset, "
                    "[onset, fire] hatched. " + "; ".join(parts) + ".")
        if name == "phases":
            out = []
            for s in n["stages"]:
                a = s["accuracy"]
                acc = ("accuracy n/a (policy cut the trap rollouts)" if a.get("note") else
                       f"accuracy trap {_num(a['trap'], '.2f')}{_ci(*a['trap_ci'], '.2f')} (n={a['graded_trap']}) vs "
                       f"no trap {_num(a['no_trap'], '.2f')}{_ci(*a['no_trap_ci'], '.2f')} (n={a['graded_no_trap']})")
                out.append(f"{s['stage']}: trap in {_pct(s['trap_share'])} of rollouts, {acc}")
            return "Phases with hindsight (pre / agreement / post) per stage; " + "; ".join(out) + "."
        if name == "gradproj":
            k1 = {a["phase"]: a for a in n["aggregate"] if a["k"] == 1}
            parts = [f"{p} {_num(a.get('one_sided_bc'), '.3f')}{_ci(a['one_sided_lo'], a['one_sided_hi'], '.3f')}"
                     for p, a in k1.items()]
            rnd = next(iter(k1.values()))["one_sided_random"] if k1 else None
            return (f"Energy of each phase's gradient ({n.get('loss_label', 'loss')}) in the update's top-k "
                    f"subspace; k = 1, bias-corrected [95 % CI]: " + ", ".join(parts)
                    + f" (random subspace {_num(rnd, '.3f')}).")
        if name == "vocab":
            js = "; ".join(f"JS({j['a']}, {j['b']}) {_num(j.get('js_bc'), '.4f')}"
                           f"{_ci(j['ci_low'], j['ci_high'], '.4f')}" for j in n["js"])
            cats = n.get("top1_categories", {})
            digits = ", ".join(f"{p} {_num(c.get('digit', {}).get('share'), '.2f')}" for p, c in cats.items())
            return (f"The teacher's proposals per phase ({n.get('weight')}-weighted top-{n.get('top')}): {js}; "
                    f"top-1 is a digit in {digits}.")
    except (KeyError, TypeError, IndexError, StopIteration):
        pass
    return ""


def _curves_caption(res: dict[str, Any]) -> str:
    parts = []
    for r in res.get("runs", []):
        ev = [(k, v) for k, v in r.items() if k.startswith("eval/mean/avg@")]
        parts.append(f"{r['run']}: " + ", ".join(f"{k.split('/')[-1]} {_num(v, '.3f')}" for k, v in ev))
    return ("Per update: mean KL, tau, generated and kept length, stopped share, evaluation (95 % Wilson bands; "
            "0 = the untrained student) and step time. Last evaluation: " + "; ".join(parts) + ".")


def _link_list(files: list[str], rel: str) -> str:
    return ", ".join(f"[`{Path(f).name}`]({rel}{Path(f).name})" for f in files)


def _numbers_table(numbers: dict[str, Any], limit: int = 60) -> list[str]:
    from kat_diag.analysis.output import flatten

    flat = {k: v for k, v in flatten({k: v for k, v in numbers.items() if k != "files"}).items()}
    lines = ["<details><summary>numbers</summary>", "", "| quantity | value |", "|---|---|"]
    for k, v in list(flat.items())[:limit]:
        val = f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v))
        lines.append(f"| `{k}` | {val} |")
    if len(flat) > limit:
        lines.append(f"| … | {len(flat) - limit} more in the data files |")
    return lines + ["", "</details>"]


def make_figures(run_dirs: Sequence[str | Path], out_dir: str | Path, *, analyses: Sequence[str] | None = None,
                 curves: bool = True, study: str | Path | None = None, paper: bool = False) -> dict[str, Any]:
    """Write all figures of these runs into ``out_dir`` and ``out_dir/summary.md``; returns what was done
    (per analysis: numbers, seconds, or the reason it was skipped / the error it raised). ``study``:
    a study's results.json whose headline figure goes first (``study.png``). ``paper``: 300-dpi PNGs
    plus PDFs."""
    from kat_diag.analysis import style
    from kat_diag.analysis.curves import run_curves, unique_names

    runs = [Path(r) for r in run_dirs]
    if not runs and study is None:
        raise ValueError("figures needs at least one run directory (or --study RESULTS_JSON)")
    for r in runs:
        if not r.is_dir():
            raise FileNotFoundError(f"run directory {r} does not exist")
        if not (r / "metrics.jsonl").is_file() and not (r / "traces").is_dir() and not any(r.glob("part-*.parquet")):
            raise ValueError(f"{r}: not a run directory (no metrics.jsonl and no traces/ store): nothing to draw")
    names = analyses if analyses is not None else list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"--only: unknown analyses {unknown}; known: {sorted(REGISTRY)}")
    style.set_mode("paper" if paper else "screen")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = unique_names(runs) if runs else []
    done: dict[str, Any] = {"out": str(out), "runs": [str(r) for r in runs], "analyses": {}}
    md = ["# kat-diag figures", "",
          "Regenerated by `kat-diag figures` (`make figures`). Every figure is embedded below with one line "
          "on what it shows; its numbers are in the data files linked under it and in the collapsed table.", ""]
    if runs:
        md += ["Runs: " + ", ".join(f"`{r}`" for r in runs), ""]

    if study is not None:
        from kat_diag.analysis.study_figure import run_study_figure

        res = run_study_figure(study, out / "study.png")
        done["study"] = res
        md += ["## Study: every method against OPD", "", "![study](study.png)", "",
               "avg@k and pass@k per method (seeds and their spread) and each method minus OPD, paired over "
               "problems with a 95 % bootstrap interval.", "",
               f"Data: [`study_figure.json`](study_figure.json), from `{study}`.", ""]

    if curves and runs:
        t0 = time.perf_counter()
        try:
            res = run_curves(runs, out, labels)
            done["curves"] = {**res, "seconds": time.perf_counter() - t0}
            md += ["## Training curves", "", "![training curves](curves.png)", "", _curves_caption(res), "",
                   "Data: " + _link_list(_files(res)[1:], ""), ""]
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
            files = _files(numbers)
            pngs = [Path(f).name for f in files if f.endswith(".png")]
            md += [f"![{a.title}]({rel}{p})" for p in pngs] + [""]
            line = caption(name, numbers)
            if line:
                md += [line, ""]
            md += ["Data: " + _link_list([f for f in files if not f.endswith(".png")], rel), ""]
            md += [*_numbers_table(numbers), ""]
        done["analyses"][label] = per
    (out / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    done["summary"] = str(out / "summary.md")
    return done
