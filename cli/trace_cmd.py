"""CLI commands on a recorded trace store: `inspect` (summary, one rollout) and `replay` (offline KAT).

Thin layer: parse the options, call kat_diag.traces / kat_diag.views, print.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from cli.common import fail, strict_json


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


def _open(run: Path, skip_corrupt: bool, allow_foreign: bool = False) -> Any:
    from kat_diag.traces.reader import TraceReader

    # errors: `error: ...`, exit 2
    return TraceReader(run, on_error="skip" if skip_corrupt else "raise", allow_foreign=allow_foreign)


def _fail(message: str) -> None:
    fail(message)


def _json(obj: Any) -> str:
    return strict_json(obj)


def _settings(reader: Any) -> tuple[dict[str, Any] | None, str]:
    """The run settings of the store: manifest, else the run's config.json, else (None, why)."""
    from kat_diag.views.rollout import store_config

    return store_config(reader)


def _auto_tokenizer(tokenizer: Path | None, config: dict[str, Any] | None) -> Any:
    """--tokenizer, else the run's student tokenizer when it is on this machine (for the teacher's
    alternatives as text), else None. Never runs remote code."""
    from kat_diag.models import load_tokenizer

    path = tokenizer
    if path is None and config and config.get("student"):
        cand = Path(str(config["student"]))
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
            path = cand
    if path is None:
        return None
    return load_tokenizer(path, what="--tokenizer")


# KAT fields that phase marks and a fixed-tau replay read (an adaptive replay reads them all).
PHASE_FIELDS = ("window", "persistence", "min_length")
STEPS_HELP = "Only rollouts of these training steps: A:B (inclusive), A:, :B or A."
POLICY_HELP = "Only rollouts of this termination policy (repeatable)."
RANK_HELP = "Only rollouts written by this rank (repeatable)."
STOP_HELP = "Only rollouts with this stop reason, e.g. eos, max_len, policy (repeatable)."
SKIP_HELP = "Skip unreadable trace files with a warning instead of failing."
FOREIGN_HELP = ("Read trace files written by another run (their run id differs from the store's "
                "manifest) instead of refusing them; rollout ids must still be unique.")


def inspect(
    run: Path = typer.Argument(..., help="Run directory (or its traces/ directory)."),
    rollout: int | None = typer.Option(None, "--rollout", help="Render this rollout id token by token."),
    html: Path | None = typer.Option(None, "--html", help="With --rollout: write the rendering as a "
                                     "standalone HTML page to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the rollout's fields with "
                                 "--rollout, or the list with --list) as JSON."),
    list_rollouts: bool = typer.Option(False, "--list", help="List the rollouts: id, step, policy, prompt, "
                                       "correctness, length, kept length, fire, stop reason."),
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
                                      "(default: the run config's)."),
    persistence: int | None = typer.Option(None, "--persistence", help="KAT persistence T for the phase "
                                           "marks (default: the run config's)."),
    min_length: int | None = typer.Option(None, "--min-length", help="KAT minimum length L0 for the phase "
                                          "marks (default: the run config's)."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help=SKIP_HELP),
    allow_foreign: bool = typer.Option(False, "--allow-foreign", help=FOREIGN_HELP),
) -> None:
    """Summarise a trace store, or render one rollout with each token coloured by its KL."""
    with _warnings_to_stderr():
        _inspect(run, rollout, html, as_json, list_rollouts, _filters(steps, policy, rank, stop_reason), color,
                 tokenizer, kl_min, kl_max, window, persistence, min_length, skip_corrupt, allow_foreign)


def _inspect(run: Path, rollout: int | None, html: Path | None, as_json: bool, list_rollouts: bool,
             filters: dict[str, Any], color: bool | None, tokenizer: Path | None, kl_min: float, kl_max: float,
             window: int | None, persistence: int | None, min_length: int | None, skip_corrupt: bool,
             allow_foreign: bool = False) -> None:
    if not 0 < kl_min < kl_max:
        raise typer.BadParameter(f"need 0 < --kl-min < --kl-max, got --kl-min {kl_min:g} --kl-max {kl_max:g}")
    if html is not None and rollout is None:
        raise typer.BadParameter("--html needs --rollout ID")
    if list_rollouts and rollout is not None:
        raise typer.BadParameter("--list and --rollout exclude each other")
    if html is not None:
        _check_output_file("--html", html)
    from kat_diag.views.html import render_html
    from kat_diag.views.rollout import (
        MissingSettings,
        kat_config,
        problem_index,
        rollout_json,
        rollout_phases,
        teacher_alternatives,
    )
    from kat_diag.views.summary import format_list, format_summary, rollout_list, summarize
    from kat_diag.views.terminal import render_terminal

    reader = _open(run, skip_corrupt, allow_foreign)
    if list_rollouts:
        rows = rollout_list(reader, **filters)
        if as_json:
            typer.echo(_json(rows))
        else:
            typer.echo(format_list(rows, problem_index(_settings(reader)[0])))
        return
    if rollout is None:
        summary = summarize(reader, **filters)
        typer.echo(_json(summary) if as_json else format_summary(summary))
        return

    try:
        row = reader.rollout(rollout)
    except KeyError:
        _fail(f"--rollout {rollout} is not in {reader.dir} (list the ids with --list)")
    config, source = _settings(reader)
    try:
        kat = kat_config(config, source=source, needed=PHASE_FIELDS, window=window,
                                    persistence=persistence, min_length=min_length)
        phases = rollout_phases(row, kat)
    except MissingSettings as e:
        typer.echo(f"warning: {e}; phase marks omitted", err=True)
        phases = None
    problem = problem_index(config).get(str(row.get("prompt_id")))
    row["prompt_text"] = None if problem is None else problem.prompt
    row["expected"] = None if problem is None else problem.answer
    tok = _auto_tokenizer(tokenizer, config)
    if html is not None:
        html.write_text(render_html(row, phases=phases, kl_range=(kl_min, kl_max), tokenizer=tok),
                        encoding="utf-8")
        typer.echo(f"wrote {html}", err=True)
        return
    if as_json:
        out = rollout_json(row, phases)
        alts = teacher_alternatives(row, tok)
        out["teacher_top_text"] = None if alts is None else [[t for t, _ in a] for a in alts]
        typer.echo(_json(out))
        return
    use_color = sys.stdout.isatty() if color is None else color
    typer.echo(render_terminal(row, phases=phases, kl_range=(kl_min, kl_max), color=use_color,
                                          tokenizer=tok), nl=False, color=use_color)


def _check_output_file(option: str, path: Path) -> None:
    """An output file can be written: its directory exists and is writable, it is not a directory."""
    import os

    if path.is_dir():
        fail(f"{option} {path} is a directory, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        fail(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"{option} {path}: not writable")


def _parse_tau(tau: str | None) -> float | str | None:
    if tau is None or tau == "recorded":
        return tau
    try:
        value = float(tau)
    except ValueError as e:
        raise typer.BadParameter(f"--tau expects a number or 'recorded', got {tau!r}") from e
    if not value > 0 or value == float("inf"):  # NaN fails `> 0`; KL >= 0: no window is below tau <= 0
        raise typer.BadParameter(f"--tau must be a finite number > 0 (nats) or 'recorded', got {tau}")
    return value


def replay(
    run: Path = typer.Argument(..., help="Run directory (or its traces/ directory) to replay KAT over."),
    window: int | None = typer.Option(None, "--window", help="W: tokens per window mean "
                                      "(default: the run config's kat.window)."),
    persistence: int | None = typer.Option(None, "--persistence", help="T: consecutive low windows "
                                           "needed to fire (default: the run config's)."),
    min_length: int | None = typer.Option(None, "--min-length", help="L0: never fire before this many "
                                          "tokens (default: the run config's)."),
    statistic: str | None = typer.Option(None, "--statistic", "--kat-statistic", help="What each rollout "
                                         "pushes into the threshold buffer: 'rollout_min' (its minimum window "
                                         "mean, the paper's rule) or 'windows' (its stride-W window means) "
                                         "(default: the run config's)."),
    tau_quantile: float | None = typer.Option(None, "--tau-quantile", help="tau = this quantile of the "
                                              "buffer, in (0, 1); the paper's eta = 0.3 is 0.7 "
                                              "(default: the run config's)."),
    min_fill: int | None = typer.Option(None, "--min-fill", help="B_min: KAT stays inactive until the "
                                        "buffer holds this many values (default: the run config's)."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="K: steps during which KAT "
                                            "only fills its buffer (default: the run config's)."),
    buffer_size: int | None = typer.Option(None, "--buffer-size", help="B: values kept in the FIFO "
                                           "buffer (default: the run config's)."),
    keep: str | None = typer.Option(None, "--keep", help="Kept tokens when fired: 'onset' ([0, onset)) "
                                    "or 'fire' ([0, fire]) (default: the run config's)."),
    tau: str | None = typer.Option(None, "--tau", help="Fixed threshold (nats) for every rollout, or "
                                   "'recorded' for each rollout's recorded tau (reproduces the online "
                                   "decisions). Default: adaptive, derived step by step like KAT online."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    out: Path | None = typer.Option(None, "--out", help="Write per-rollout results (rollout_id, step, "
                                    "tau, onset, fire, keep, length, phases, recorded onset/fire) "
                                    "to this Parquet file."),
    steps: str | None = typer.Option(None, "--steps", help=STEPS_HELP),
    policy: list[str] | None = typer.Option(None, "--policy", help=POLICY_HELP),
    rank: list[int] | None = typer.Option(None, "--rank", help=RANK_HELP),
    stop_reason: list[str] | None = typer.Option(None, "--stop-reason", help=STOP_HELP),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help=SKIP_HELP),
    allow_foreign: bool = typer.Option(False, "--allow-foreign", help=FOREIGN_HELP),
) -> None:
    """Run the KAT detector offline over recorded traces and report what KAT would have done."""
    tau_value = _parse_tau(tau)
    filters = _filters(steps, policy, rank, stop_reason)
    if out is not None:
        _check_output_file("--out", out)  # before the replay is computed, not after
    from kat_diag.analysis import replay as store_replay
    from kat_diag.views.rollout import kat_config

    with _warnings_to_stderr():
        reader = _open(run, skip_corrupt, allow_foreign)
        config, source = _settings(reader)
        needed = None if tau_value is None else PHASE_FIELDS + ("keep",)  # fixed tau needs no buffer settings
        cfg = kat_config(config, source=source, needed=needed, window=window, persistence=persistence,
                                    min_length=min_length, tau_quantile=tau_quantile, statistic=statistic,
                                    min_fill=min_fill, warmup_steps=warmup_steps, buffer_size=buffer_size,
                                    keep=keep)
        result = store_replay.replay_store(reader, cfg, tau_value, per_rollout=out is not None, progress=True,
                                         **filters)
    if out is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = result.pop("rows")
        pq.write_table(pa.table({k: pa.array(v) for k, v in rows.items()}), out)
    typer.echo(_json(result) if as_json else store_replay.format_replay(result))
    if out is not None and not as_json:
        typer.echo(f"per-rollout results: {out}", err=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("inspect")(inspect)
    app.command("replay")(replay)
