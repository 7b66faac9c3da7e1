"""CLI commands of the offline analyses: `heatmap`, `phases` and `figures`.

Thin layer: parse the options, call kat_diag.analysis, print a short summary (or `--json`).
Each command writes NAME.png and the numbers behind it into `--out` (default RUN/analysis).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

RUN_HELP = "Run directory (or its traces/ directory)."
OUT_HELP = "Output directory for the PNG and its data (default: RUN/analysis)."
TAU_HELP = ("Threshold for the replayed detector: 'auto' (recorded tau where finite, else one tau derived "
            "from the store with the run's KAT rule), 'derived' (the derived tau for every rollout) or a "
            "number in nats.")
EARLY_HELP = "Early stage step range A:B (inclusive; default: the first tenth of the recorded steps)."
LATE_HELP = "Late stage step range A:B (inclusive; default: the last tenth of the recorded steps)."
WINDOW_HELP = "KAT window W (default: the run config's, else KATConfig's)."
PERSIST_HELP = "KAT persistence T (default: the run config's, else KATConfig's)."
MINLEN_HELP = "KAT minimum length L0 (default: the run config's, else KATConfig's)."
JSON_HELP = "Print the numbers as one JSON object."
SEED_HELP = "Seed of the rollout samples."


def _setup(run: Path, out: Path | None, window: int | None, persistence: int | None,
           min_length: int | None, tau: str) -> tuple[Any, Path, Any]:
    from kat_diag.analysis.threshold import parse_tau
    from kat_diag.traces.reader import TraceReader
    from kat_diag.views.rollout import kat_config

    reader = TraceReader(run)
    try:
        cfg = kat_config(reader.config, window=window, persistence=persistence, min_length=min_length)
        tau_value = parse_tau(tau)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    out_dir = out or (reader.dir.parent if reader.dir.name == "traces" else reader.dir) / "analysis"
    return cfg, out_dir, tau_value


def _ranges(early: str | None, late: str | None) -> dict[str, Any]:
    from kat_diag.analysis.store import parse_range

    try:
        return {"early": parse_range(early, "--early"), "late": parse_range(late, "--late")}
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _num(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def heatmap(
    run: Path = typer.Argument(..., help=RUN_HELP),
    out: Path | None = typer.Option(None, "--out", help=OUT_HELP),
    tau: str = typer.Option("auto", "--tau", help=TAU_HELP),
    early: str | None = typer.Option(None, "--early", help=EARLY_HELP),
    late: str | None = typer.Option(None, "--late", help=LATE_HELP),
    sort: str = typer.Option("verdict", "--sort", help="Row order: verdict (wrong, loop, no answer, right; then "
                             "onset: the order that shows the trap) | length | onset | correct | none."),
    rows: int = typer.Option(300, "--rows", help="Rollouts drawn per stage (a seeded sample of --sample)."),
    sample: int = typer.Option(2000, "--sample", help="Rollouts per stage behind the aggregate panels "
                               "(seeded sample; all when fewer)."),
    max_cols: int = typer.Option(256, "--max-cols", help="At most this many position columns; longer "
                                 "rollouts are binned (mean KL per bin)."),
    window: int | None = typer.Option(None, "--window", help=WINDOW_HELP),
    persistence: int | None = typer.Option(None, "--persistence", help=PERSIST_HELP),
    min_length: int | None = typer.Option(None, "--min-length", help=MINLEN_HELP),
    seed: int = typer.Option(0, "--seed", help=SEED_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Rollouts x token position heatmap of the reverse KL, early vs late, with aggregate panels."""
    from kat_diag.analysis.heatmap import SORT_KEYS, run_heatmap

    if sort not in SORT_KEYS:
        raise typer.BadParameter(f"--sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    for option, value in (("--rows", rows), ("--sample", sample), ("--max-cols", max_cols)):
        if value < 1:
            raise typer.BadParameter(f"{option} must be >= 1, got {value}")
    cfg, out_dir, tau_value = _setup(run, out, window, persistence, min_length, tau)
    res = run_heatmap(run, out_dir, cfg=cfg, tau=tau_value, sort=sort, rows=rows, sample=sample, max_cols=max_cols,
                      seed=seed, **_ranges(early, late))
    if as_json:
        typer.echo(json.dumps(res, allow_nan=False))
        return
    for s in res["stages"]:
        typer.echo(f"{s['stage']:>5} steps {s['steps'][0]}-{s['steps'][1]}: {s['rollouts']} rollouts, "
                   f"{s['sampled']} sampled, tau {_num(s['tau_median'])}, extended low-KL "
                   f"{_num(s['extended_low_kl_share'], '.1%')}, first start median "
                   f"{_num(s['first_segment_median_start'], '.0f')}, KL after/before "
                   f"{_num(s['kl_after_over_before'])}")
    typer.echo(f"x axis ends at token {res['x_limit']} (95th percentile of the shown lengths); rows and their "
               "inspect addresses: heatmap_rows.csv")
    typer.echo("wrote " + ", ".join(res["files"]))


def phases(
    run: Path = typer.Argument(..., help=RUN_HELP),
    out: Path | None = typer.Option(None, "--out", help=OUT_HELP),
    tau: str = typer.Option("auto", "--tau", help=TAU_HELP),
    early: str | None = typer.Option(None, "--early", help=EARLY_HELP),
    late: str | None = typer.Option(None, "--late", help=LATE_HELP),
    window: int | None = typer.Option(None, "--window", help=WINDOW_HELP),
    persistence: int | None = typer.Option(None, "--persistence", help=PERSIST_HELP),
    min_length: int | None = typer.Option(None, "--min-length", help=MINLEN_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample the derived tau is computed from."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Phase segmentation of every rollout (docs/kat.md#phases): per-phase table, trap accuracy, heatmap findings."""
    from kat_diag.analysis.phase_stats import run_phases

    cfg, out_dir, tau_value = _setup(run, out, window, persistence, min_length, tau)
    res = run_phases(run, out_dir, cfg=cfg, tau=tau_value, seed=seed, **_ranges(early, late))
    if as_json:
        typer.echo(json.dumps(res, allow_nan=False))
        return
    typer.echo(f"tau: {res['tau']['mode']} (derived {_num(res['tau']['derived'])}, recorded for "
               f"{_num(res['tau']['recorded_share'], '.0%')} of rollouts)")
    typer.echo(f"{'stage':>6} {'phase':>10} {'tokens':>8} {'share':>7} {'mean KL':>9} {'H student':>9} "
               f"{'H teacher>=':>11}")
    for s in res["stages"]:
        for name, p in s["phases"].items():
            typer.echo(f"{s['stage']:>6} {name:>10} {p['tokens']:>8} {_num(p['token_share'], '.1%'):>7} "
                       f"{_num(p['mean_kl'], '.4f'):>9} {_num(p['student_entropy'], '.3f'):>9} "
                       f"{_num(p['teacher_entropy_lb'], '.3f'):>11}")
    def ci(pair: list[Any] | None, fmt: str = ".3f") -> str:
        return "" if not pair or pair[0] is None else f" [{pair[0]:{fmt}}, {pair[1]:{fmt}}]"

    for s in res["stages"]:
        a, f = s["accuracy"], s["findings"]
        acc = (f"accuracy with trap {_num(a['trap'], '.3f')}{ci(a['trap_ci'])} (n={a['graded_trap']}), without "
               f"{_num(a['no_trap'], '.3f')}{ci(a['no_trap_ci'])} (n={a['graded_no_trap']})")
        if a.get("note"):
            acc = f"accuracy with trap: does not apply ({a['trap_cut_by_policy']} trap rollouts cut at fire)"
        typer.echo(f"{s['stage']:>6}: trap {_num(s['trap_share'], '.1%')} of rollouts; {acc}; extended low-KL "
                   f"{_num(f['extended_low_kl_share'], '.1%')}{ci(f['extended_low_kl_share_ci'])}, first start median "
                   f"{_num(f['first_segment_median_start'], '.0f')}, KL before/inside/after "
                   f"{_num(f['kl_before_segment'])}/{_num(f['kl_inside_segment'])}/{_num(f['kl_after_segment'])}")
    typer.echo("[95 % CI]: Wilson for shares and accuracies; per-phase means in --json carry bootstrap CIs over "
               "rollouts")
    typer.echo("wrote " + ", ".join(res["files"]))


def _files(res: dict[str, Any]) -> list[str]:
    f = res.get("files", [])
    return [str(v) for v in (f.values() if isinstance(f, dict) else f)]


def figures(
    runs: list[Path] | None = typer.Argument(None, help="Run directories; training curves are overlaid, per-run "
                                             "figures go into OUT/<run name>/ when there are several."),
    out: Path = typer.Option(Path("figures"), "--out", help="Output directory (summary.md, PNGs, data)."),
    only: str | None = typer.Option(None, "--only", help="Comma-separated per-run analyses to draw "
                                    "(default: all registered)."),
    curves: bool = typer.Option(True, "--curves/--no-curves", help="Draw the training curves of the runs."),
    study: Path | None = typer.Option(None, "--study", help="A study's results.json: draw its headline figure "
                                      "(OUT/study.png: every method against OPD with paired CIs) first."),
    paper: bool = typer.Option(False, "--paper", help="300-dpi PNGs plus a PDF of each figure."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written and the numbers as JSON."),
) -> None:
    """Every figure of one or more runs (and of a study), plus OUT/summary.md embedding each with its numbers."""
    from kat_diag.analysis.figures import REGISTRY, make_figures

    names = None
    if only is not None:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise typer.BadParameter(f"--only: unknown {unknown}; known: {', '.join(REGISTRY)}")
    if not runs and study is None:
        raise typer.BadParameter("give run directories, --study RESULTS_JSON, or both")
    res = make_figures(runs or [], out, analyses=names, curves=curves, study=study, paper=paper)
    if as_json:
        typer.echo(json.dumps(res, allow_nan=False, default=str))
        return
    if "study" in res:
        typer.echo("study: " + ", ".join(res["study"]["files"]))
    c = res.get("curves")
    if c is not None:
        typer.echo(f"curves: {c.get('skipped') or ', '.join(c['files'])}")
    for label, per in res["analyses"].items():
        for name, r in per.items():
            what = (f"skipped ({r['skipped']})" if "skipped" in r else f"FAILED ({r['error']})" if "error" in r
                    else f"{r['seconds']:.1f} s: " + ", ".join(_files(r)))
            typer.echo(f"{label}/{name}: {what}")
    typer.echo(f"summary: {res['summary']}")
    if any("error" in r for per in res["analyses"].values() for r in per.values()):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("heatmap")(heatmap)
    app.command("phases")(phases)
    app.command("figures")(figures)
