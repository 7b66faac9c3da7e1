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
        allow_foreign: bool = typer.Option(False, "--allow-foreign", help="Read trace files written by another "
                                           "run instead of refusing them (rollout ids must stay unique)."),
    ) -> None:
        """Replay KAT on a store and report the trap: fire rates right vs wrong, tokens cut, low-KL
        spans, and (embedded world) onsets against the first error."""
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
