"""CLI commands on a recorded trace store: `inspect` (summary, one rollout) and `replay` (offline KAT).

Thin layer: parse the options, call kat_diag.traces / kat_diag.trace_view, print.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from kat_diag.traces import TraceReader, TraceStoreError


def _parse_steps(steps: str | None) -> tuple[int | None, int | None] | None:
    """'A:B' (inclusive, either side may be empty) or 'A' -> step range."""
    if steps is None:
        return None
    try:
        if ":" in steps:
            lo, hi = steps.split(":", 1)
            return (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
        return (int(steps), int(steps))
    except ValueError as e:
        raise typer.BadParameter(f"--steps expects A:B, A: , :B or A, got {steps!r}") from e


def _filters(steps: str | None, policy: list[str] | None, rank: list[int] | None,
             stop_reason: list[str] | None) -> dict[str, Any]:
    return {"steps": _parse_steps(steps), "policy": policy or None, "rank": rank or None,
            "stop_reason": stop_reason or None}


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show library warnings (skipped files) as one plain stderr line each, not Python tracebacks."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                typer.echo(f"warning: {w.message}", err=True)


def _open(run: Path, skip_corrupt: bool) -> TraceReader:
    try:
        return TraceReader(run, on_error="skip" if skip_corrupt else "raise")
    except TraceStoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _json(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, default=str)


STEPS_HELP = "Only rollouts of these training steps: A:B (inclusive), A:, :B or A."
POLICY_HELP = "Only rollouts of this termination policy (repeatable)."
RANK_HELP = "Only rollouts written by this rank (repeatable)."
STOP_HELP = "Only rollouts with this stop reason, e.g. eos, max_len, policy (repeatable)."
SKIP_HELP = "Skip unreadable trace files with a warning instead of failing."


def inspect(
    run: Path = typer.Argument(..., help="Run directory (or its traces/ directory)."),
    rollout: int | None = typer.Option(None, "--rollout", help="Render this rollout id token by token."),
    html: Path | None = typer.Option(None, "--html", help="With --rollout: write the rendering as a "
                                     "standalone HTML page to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the rollout's fields with "
                                 "--rollout) as one JSON object."),
    steps: str | None = typer.Option(None, "--steps", help=STEPS_HELP),
    policy: list[str] | None = typer.Option(None, "--policy", help=POLICY_HELP),
    rank: list[int] | None = typer.Option(None, "--rank", help=RANK_HELP),
    stop_reason: list[str] | None = typer.Option(None, "--stop-reason", help=STOP_HELP),
    color: bool | None = typer.Option(None, "--color/--no-color", help="Colour tokens with ANSI codes "
                                      "(default: when stdout is a terminal)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Hugging Face tokenizer directory "
                                          "to decode tokens when the store has no token_text."),
    kl_min: float = typer.Option(1e-3, "--kl-min", help="KL (nats) at the bottom of the log colour scale."),
    kl_max: float = typer.Option(10.0, "--kl-max", help="KL (nats) at the top of the log colour scale."),
    window: int | None = typer.Option(None, "--window", help="KAT window W for the phase marks "
                                      "(default: the run config's, else KATConfig's)."),
    persistence: int | None = typer.Option(None, "--persistence", help="KAT persistence T for the phase "
                                           "marks (default: the run config's, else KATConfig's)."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help=SKIP_HELP),
) -> None:
    """Summarise a trace store, or render one rollout with each token coloured by its KL."""
    with _warnings_to_stderr():
        _inspect(run, rollout, html, as_json, _filters(steps, policy, rank, stop_reason), color, tokenizer,
                 kl_min, kl_max, window, persistence, skip_corrupt)


def _inspect(run: Path, rollout: int | None, html: Path | None, as_json: bool, filters: dict[str, Any],
             color: bool | None, tokenizer: Path | None, kl_min: float, kl_max: float, window: int | None,
             persistence: int | None, skip_corrupt: bool) -> None:
    from kat_diag import trace_view

    if not 0 < kl_min < kl_max:
        raise typer.BadParameter("need 0 < --kl-min < --kl-max")
    reader = _open(run, skip_corrupt)
    if rollout is None:
        if html is not None:
            raise typer.BadParameter("--html needs --rollout ID")
        try:
            summary = trace_view.summarize(reader, **filters)
        except TraceStoreError as e:
            _fail(str(e))
        typer.echo(_json(summary) if as_json else trace_view.format_summary(summary))
        return

    try:
        row = reader.rollout(rollout)
    except KeyError:
        _fail(f"rollout {rollout} is not in {reader.dir}")
    except TraceStoreError as e:
        _fail(str(e))
    phases = trace_view.rollout_phases(row, trace_view.kat_config(reader.config, window=window,
                                                                   persistence=persistence))
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    if html is not None:
        html.write_text(trace_view.render_html(row, phases=phases, kl_range=(kl_min, kl_max), tokenizer=tok),
                        encoding="utf-8")
        typer.echo(f"wrote {html}")
        return
    if as_json:
        typer.echo(_json(trace_view.rollout_json(row, phases)))
        return
    use_color = sys.stdout.isatty() if color is None else color
    typer.echo(trace_view.render_terminal(row, phases=phases, kl_range=(kl_min, kl_max), color=use_color,
                                          tokenizer=tok), nl=False, color=use_color)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("inspect")(inspect)
