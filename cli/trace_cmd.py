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
    step_at: int | None = typer.Option(None, "--step", help="With --index: render the rollout of this training "
                                       "step (the 'step/index' column of --list)."),
    index: int | None = typer.Option(None, "--index", help="With --step: the rollout's index within the step "
                                     "(and --rank, default 0)."),
    html: Path | None = typer.Option(None, "--html", help="With --rollout (or --step/--index): write the rendering "
                                     "as a standalone HTML page to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the rollout's fields with "
                                 "--rollout, or the list with --list) as JSON."),
    list_rollouts: bool = typer.Option(False, "--list", help="List the rollouts: id, step/index, policy, prompt, "
                                       "verdict, length, kept, onset, fire, tau, minimum window mean, first error, "
                                       "stop reason."),
    sort: str = typer.Option("step", "--sort", help="With --list: order by step | onset | fire | tau | min_window | "
                             "length | kept | verdict | first_error (missing values last)."),
    descending: bool = typer.Option(False, "--desc", help="With --list: largest first."),
    verdict: list[str] | None = typer.Option(None, "--verdict", help="With --list: only rollouts with this "
                                             "verdict: right | wrong | loop | unfinished | ungraded (repeatable)."),
    fired: bool | None = typer.Option(None, "--fired/--not-fired", help="With --list: only rollouts where KAT "
                                      "fired (or did not)."),
    steps: str | None = typer.Option(None, "--steps", help=STEPS_HELP),
    policy: list[str] | None = typer.Option(None, "--policy", help=POLICY_HELP),
    rank: list[int] | None = typer.Option(None, "--rank", help=RANK_HELP + " With --step/--index: the rank of "
                                          "the rollout (default 0)."),
    stop_reason: list[str] | None = typer.Option(None, "--stop-reason", help=STOP_HELP),
    color: bool | None = typer.Option(None, "--color/--no-color", help="Colour tokens with ANSI codes "
                                      "(default: when stdout is a terminal). Without colour KL shows as glyphs."),
    color_depth: str = typer.Option("auto", "--color-depth", help="auto (truecolor when COLORTERM says so, else "
                                    "256) | 256 | truecolor."),
    tau: float | None = typer.Option(None, "--tau", help="Threshold (nats) the window track is drawn against "
                                     "(default: the rollout's recorded tau; needed for runs where KAT was "
                                     "inactive, e.g. plain OPD)."),
    width: int = typer.Option(64, "--width", help="Tokens per line of the window track."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Hugging Face tokenizer directory "
                                          "to decode tokens when the store has no token_text."),
    kl_min: float = typer.Option(1e-3, "--kl-min", help="KL (nats) at the bottom of the log colour scale."),
    kl_max: float = typer.Option(10.0, "--kl-max", help="KL (nats) at the top of the log colour scale."),
    window: int | None = typer.Option(None, "--window", help="KAT window W for the track and phase marks "
                                      "(default: the run config's)."),
    persistence: int | None = typer.Option(None, "--persistence", help="KAT persistence T for the track and phase "
                                           "marks (default: the run config's)."),
    min_length: int | None = typer.Option(None, "--min-length", help="KAT minimum length L0 for the track and "
                                          "phase marks (default: the run config's)."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help=SKIP_HELP),
    allow_foreign: bool = typer.Option(False, "--allow-foreign", help=FOREIGN_HELP),
) -> None:
    """Summarise a trace store, list its rollouts, or explain one rollout: the window track against tau,
    the marks (L0, first error, loop start, onset, fire), the teacher's alternatives, the tokens by KL."""
    from cli.common import check_positive

    if (step_at is None) != (index is None):
        raise typer.BadParameter("--step and --index go together (the rollout's step and its index in the step)")
    if step_at is not None:
        if rollout is not None:
            raise typer.BadParameter("--rollout and --step/--index exclude each other")
        from kat_diag.traces.schema import make_rollout_id

        try:
            rollout = make_rollout_id(step_at, rank[0] if rank else 0, index)
        except ValueError as e:
            fail(f"--step {step_at} --index {index}: {e}")
    check_positive("--width", width)
    if color_depth not in ("auto", "256", "truecolor"):
        raise typer.BadParameter(f"--color-depth must be auto, 256 or truecolor, got {color_depth!r}")
    if tau is not None and not (tau > 0 and tau == tau and tau != float("inf")):
        raise typer.BadParameter(f"--tau must be a finite number > 0, got {tau}")
    listing = {"sort": sort, "descending": descending, "verdict": verdict or None, "fired": fired}
    with _warnings_to_stderr():
        _inspect(run, rollout, html, as_json, list_rollouts, _filters(None if step_at is not None else steps, policy,
                                                                     None if step_at is not None else rank,
                                                                     stop_reason),
                 color, tokenizer, kl_min, kl_max, window, persistence, min_length, skip_corrupt, listing,
                 color_depth, tau, width, allow_foreign)


def _inspect(run: Path, rollout: int | None, html: Path | None, as_json: bool, list_rollouts: bool,
             filters: dict[str, Any], color: bool | None, tokenizer: Path | None, kl_min: float, kl_max: float,
             window: int | None, persistence: int | None, min_length: int | None, skip_corrupt: bool,
             listing: dict[str, Any], color_depth: str, tau: float | None, width: int,
             allow_foreign: bool = False) -> None:
    if not 0 < kl_min < kl_max:
        raise typer.BadParameter(f"need 0 < --kl-min < --kl-max, got --kl-min {kl_min:g} --kl-max {kl_max:g}")
    if html is not None and rollout is None:
        raise typer.BadParameter("--html needs --rollout ID (or --step S --index I)")
    if list_rollouts and rollout is not None:
        raise typer.BadParameter("--list and --rollout exclude each other")
    from kat_diag.views.summary import LIST_SORT_KEYS, VERDICT_ORDER

    if listing["sort"] not in LIST_SORT_KEYS:
        raise typer.BadParameter(f"--sort must be one of {', '.join(LIST_SORT_KEYS)}, got {listing['sort']!r}")
    bad = [v for v in listing["verdict"] or [] if v not in VERDICT_ORDER]
    if bad:
        raise typer.BadParameter(f"--verdict must be one of {', '.join(VERDICT_ORDER)}, got {bad[0]!r}")
    if html is not None:
        _check_output_file("--html", html)
    from kat_diag.views.colors import color_depth as detect_depth
    from kat_diag.views.html import render_html
    from kat_diag.views.rollout import (
        MissingSettings,
        kat_config,
        problem_index,
        rollout_json,
        rollout_phases,
        teacher_alternatives,
    )
    from kat_diag.views.summary import filter_rows, format_list, format_summary, rollout_list, sort_rows, summarize
    from kat_diag.views.terminal import render_terminal
    from kat_diag.views.track import window_track

    reader = _open(run, skip_corrupt, allow_foreign)
    if list_rollouts:
        config, source = _settings(reader)
        try:
            w = kat_config(config, source=source, needed=("window",), window=window).window
        except MissingSettings as e:
            typer.echo(f"warning: {e}; minimum window mean omitted", err=True)
            w = None
        rows = rollout_list(reader, window=w, **filters)
        rows = filter_rows(rows, listing["verdict"], listing["fired"])
        rows = sort_rows(rows, listing["sort"], listing["descending"])
        if as_json:
            typer.echo(_json(rows))
        else:
            typer.echo(format_list(rows, problem_index(config)))
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
    track = None
    try:
        kat = kat_config(config, source=source, needed=PHASE_FIELDS, window=window,
                         persistence=persistence, min_length=min_length)
        phases = rollout_phases({**row, "tau": row.get("tau") if tau is None else tau}, kat)
        track = window_track(row, kat, tau)
    except MissingSettings as e:
        typer.echo(f"warning: {e}; phase marks and window track omitted", err=True)
        phases = None
    problem = problem_index(config).get(str(row.get("prompt_id")))
    row["prompt_text"] = None if problem is None else problem.prompt
    row["expected"] = None if problem is None else problem.answer
    tok = _auto_tokenizer(tokenizer, config)
    if html is not None:
        html.write_text(render_html(row, phases=phases, kl_range=(kl_min, kl_max), tokenizer=tok, track=track),
                        encoding="utf-8")
        typer.echo(f"wrote {html}", err=True)
        return
    if as_json:
        out = rollout_json(row, phases)
        alts = teacher_alternatives(row, tok)
        out["teacher_top_text"] = None if alts is None else [[t for t, _ in a] for a in alts]
        if track is not None:
            out["track"] = {"tau": track.tau, "tau_source": track.tau_source, "window_mean": track.z.tolist(),
                            "low": track.low.tolist(), "count": track.count.tolist(), "marks": track.marks,
                            "min_window": track.min_window}
        typer.echo(_json(out))
        return
    use_color = sys.stdout.isatty() if color is None else color
    depth = detect_depth() if color_depth == "auto" else color_depth
    typer.echo(render_terminal(row, phases=phases, kl_range=(kl_min, kl_max), color=use_color, tokenizer=tok,
                               track=track, depth=depth, width=width), nl=False, color=use_color)


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
