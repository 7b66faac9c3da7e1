"""CLI command `kat-diag trap`: the agreement trap in a recorded trace store (kat_diag.analysis.trap)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

_LABELS = (
    ("rollouts", "rollouts", "{:.0f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("mean_length", "mean generated length (tokens)", "{:.1f}"),
    ("tau", "tau (median over rollouts)", "{:.4f}"),
    ("fire_rate_right", "KAT fires on right rollouts", "{:.3f}"),
    ("fire_rate_wrong", "KAT fires on wrong rollouts", "{:.3f}"),
    ("cut_share", "share of generated tokens cut (not trained on)", "{:.3f}"),
    ("not_generated_share", "share of generated tokens not generated (after fire)", "{:.3f}"),
    ("low_span_right", "longest low-KL span, right (mean tokens)", "{:.1f}"),
    ("low_span_wrong", "longest low-KL span, wrong (mean tokens)", "{:.1f}"),
    ("onset_after_error_share", "fired wrong rollouts with onset at/after the first error", "{:.3f}"),
    ("right_token_cut_share", "share of right rollouts' tokens cut", "{:.3f}"),
    ("loop_share_of_wrong", "wrong rollouts that loop", "{:.3f}"),
    ("fire_rate_loop", "KAT fires on looping rollouts", "{:.3f}"),
    ("fire_rate_wrong_no_loop", "KAT fires on wrong rollouts without a loop", "{:.3f}"),
)


def register(app: typer.Typer) -> None:
    @app.command("trap")
    def trap(
        store: Path = typer.Argument(..., help="Run directory or trace store of full rollouts "
                                               "(e.g. from `kat-diag record`)."),
        preset: str = typer.Option("world", "--kat-preset", help="KAT parameters: world | paper; the options below "
                                                     "override single values."),
        window: int = typer.Option(None, help="W: tokens per window mean."),
        persistence: int = typer.Option(None, help="T: consecutive low windows needed to fire."),
        min_length: int = typer.Option(None, help="L0: no fire before this many tokens."),
        tau_quantile: float = typer.Option(None, help="tau = this quantile of the buffer (paper: 0.7)."),
        statistic: str = typer.Option(None, help="Buffer values: rollout_min (paper) | windows."),
        buffer_size: int = typer.Option(None, help="B: FIFO capacity (stores of several steps)."),
        min_fill: int = typer.Option(None, help="B_min: no tau before the buffer holds this many values."),
        warmup_steps: int = typer.Option(None, help="K: steps without KAT (stores of several steps)."),
        keep: str = typer.Option(None, help="Tokens kept of a fired rollout: onset | fire."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        sweep: bool = typer.Option(False, "--sweep", help="Score a grid of KAT configurations (W, T, L0, tau "
                                   "quantile, both statistics) and the reference detectors (n-gram repetition, "
                                   "KAT's rule on student / teacher entropy) on the store: fire on wrong vs right, "
                                   "onset after the first error, tokens cut (kat_diag.analysis.sweep)."),
        windows: str = typer.Option("", help="--sweep: comma-separated W values (default 4,8,16,32,64)."),
        persistences: str = typer.Option("", help="--sweep: comma-separated T values (default 1,2,4,8,16)."),
        min_lengths: str = typer.Option("", help="--sweep: comma-separated L0 values (default 0,16,32,64,128)."),
        quantiles: str = typer.Option("", help="--sweep: comma-separated tau quantiles (default 0.3,0.5,0.7,0.8,0.9)."),
        figure: Path = typer.Option(None, help="--sweep: write the frontier figure (fire on wrong vs fire on "
                                    "right, presets marked) to this PNG."),
        label: str = typer.Option("", help="--sweep: the store's name in the table and figure (default: its "
                                  "directory name)."),
        all_rows: bool = typer.Option(False, "--all-rows", help="--sweep --json: include every configuration's "
                                      "row (thousands), not only the presets and each detector's frontier."),
        allow_foreign: bool = typer.Option(False, "--allow-foreign", help="Read trace files written by another "
                                           "run instead of refusing them (rollout ids must stay unique)."),
    ) -> None:
        """Replay KAT on a store and report the trap: fire rates right vs wrong, tokens cut, low-KL
        spans, and (embedded world) onsets against the first error. --sweep scores a grid of
        configurations and the reference detectors instead."""
        if sweep:
            single = dict(window=window, persistence=persistence, min_length=min_length, tau_quantile=tau_quantile,
                          statistic=statistic, buffer_size=buffer_size, min_fill=min_fill, warmup_steps=warmup_steps,
                          keep=keep)
            given = [k for k, v in single.items() if v is not None]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} sets one configuration; with --sweep give the "
                                 "grid (--windows, --persistences, --min-lengths, --quantiles)")
            _sweep(store, windows, persistences, min_lengths, quantiles, figure, label, as_json, all_rows,
                   allow_foreign)
            return
        from kat_diag.analysis.trap import trap_report
        from kat_diag.kat.config import kat_preset

        cfg = kat_preset(preset, window=window, persistence=persistence,
                         min_length=min_length, tau_quantile=tau_quantile, statistic=statistic,
                         buffer_size=buffer_size, min_fill=min_fill, warmup_steps=warmup_steps, keep=keep)
        res = trap_report(store, cfg, allow_foreign=allow_foreign)
        from kat_diag.analysis.store import kl_note
        from kat_diag.traces.reader import TraceReader

        reader = TraceReader(store, allow_foreign=allow_foreign)
        note = kl_note(reader)  # an imported k1 / k3 store: the detector saw an estimate, not the full KL
        if as_json:
            res = {**res, "kl_source": reader.kl_source, **({"kl_note": note} if note else {})}
            typer.echo(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                   for k, v in res.items()}))
            return
        if note:
            typer.echo(f"note: {note}")
        for key, label, fmt in _LABELS:
            if key in res:
                v = res[key]
                typer.echo(f"{label:58s} {'n/a' if math.isnan(v) else fmt.format(v)}")


def _grid_values(option: str, text: str, cast: type) -> tuple | None:
    if not text.strip():
        return None
    try:
        return tuple(cast(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated {cast.__name__} values") from None


def _sweep(store: Path, windows: str, persistences: str, min_lengths: str, quantiles: str, figure: Path | None,
           label: str, as_json: bool, all_rows: bool, allow_foreign: bool) -> None:
    from kat_diag.analysis.output import clean
    from kat_diag.analysis.sweep import SweepGrid, frontier_table, plot_frontier, sweep_report
    from kat_diag.views.text import format_table

    over = {k: v for k, v in dict(
        windows=_grid_values("--windows", windows, int), persistences=_grid_values("--persistences", persistences, int),
        min_lengths=_grid_values("--min-lengths", min_lengths, int),
        quantiles=_grid_values("--quantiles", quantiles, float)).items() if v is not None}
    rep = sweep_report(store, SweepGrid(**over), label=label or None, allow_foreign=allow_foreign)
    if figure is not None:
        rep["figure"] = str(plot_frontier([rep], figure))
    if as_json:
        out = rep if all_rows else {k: v for k, v in rep.items() if k != "rows"}
        typer.echo(json.dumps(clean(out)))
        return

    def f(v: object, pct: bool = True) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        return f"{v:.3f}" if pct else f"{v:+.0f}"

    typer.echo(f"{rep['label']}: {rep['rollouts']} rollouts, accuracy {rep['accuracy']:.3f}, "
               f"{len(rep['rows'])} configurations scored")
    rows = [[r["what"], " ".join(f"{k}={v}" for k, v in r["params"].items()), f(r["fire_wrong"]),
             f(r["fire_right"]), f(r["fire_loop"]), f(r["onset_after_error"]), f(r["onset_lag_median"], False),
             f(r["tokens_cut"]), f(r["right_tokens_cut"])] for r in frontier_table(rep)]
    typer.echo(format_table(["detector", "parameters", "fire wrong", "fire right", "fire loop", "onset>=err",
                             "lag", "cut", "right cut"], rows))
    if figure is not None:
        typer.echo(f"figure: {rep['figure']}")
