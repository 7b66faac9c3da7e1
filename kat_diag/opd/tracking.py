"""Experiment trackers behind one small interface: `--report-to tensorboard|trackio|wandb|none`.

Why it exists: users watch runs in a tracker, but the trainer must not grow a branch per backend.
The trainer calls one `Tracker` next to where it writes metrics.jsonl (same dicts, same steps),
logs a few rollouts with their per-token KL at each evaluation, and closes it at the end. Each
backend is an optional extra and imported only when selected; a missing one is a one-line error.

Resume continues the same tracker run: the run's identity (wandb id, trackio name, tensorboard log
directory) is kept in RUN/tracking.json and reused. Offline use: tensorboard writes event files in
RUN/tensorboard; trackio writes its local SQLite store (TRACKIO_DIR, default
~/.cache/huggingface/trackio, one `{project}.db` per project); wandb honours WANDB_MODE=offline
(the run is then synced later with `wandb sync RUN/wandb/offline-run-*`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("tensorboard", "trackio", "wandb")
STATE_NAME = "tracking.json"
ROLLOUTS_LOGGED = 3  # rollouts rendered (inspect HTML / text) per evaluation; the table lists all of the step
TABLE_COLUMNS = ("rollout", "step", "verdict", "fired", "onset", "fire", "kept", "gen_len", "tau", "first_error",
                 "loop_start", "answer")


def parse_report_to(values: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Transformers' `report_to` convention: names (repeatable or comma-separated), `none` for none,
    `all` for every backend."""
    if values is None:
        return ()
    items = [values] if isinstance(values, str) else list(values)
    names = [n.strip().lower() for v in items for n in str(v).split(",") if n.strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return BACKENDS
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise ValueError(f"--report-to {bad[0]!r}: expected one or more of {', '.join(BACKENDS)}, all or none")
    return tuple(dict.fromkeys(names))


_MODULES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def check_report_to(names: tuple[str, ...] | list[str]) -> None:
    """Every selected backend is installed, checked before any starts and before anything is written
    (a missing wandb used to be found after trackio had created its run and config.json was written)."""
    import importlib.util

    for n in parse_report_to(list(names)):
        if importlib.util.find_spec(_MODULES[n]) is None:
            raise ValueError(f"--report-to {n} needs the {n} package: pip install 'kat-diag[{n}]' "
                             "(nothing was started or written)")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a metrics dict (NaN, e.g. tau before warm-up, is left out)."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def rollout_rows(rollouts: list[Any], tokenizer: Any, step: int, tau: float, policy: str,
                 n: int | None = None, problems: list[Any] | None = None, kat: Any = None) -> list[dict[str, Any]]:
    """The step's rollouts (the first `n`; all by default) as rows in the trace-store format the views
    render, with the world's ground truth (first error, loop start, verdict) and the grade when
    `problems` (the rollouts' problems, in order) are given, and the run's KAT settings `kat` (a
    KATConfig: the views draw the window track with it)."""
    rows = []
    chosen = rollouts if n is None else rollouts[:n]
    texts = [tokenizer.decode(r.token_ids.tolist(), skip_special_tokens=True) for r in chosen]
    truth: dict[str, list[Any]] = {}
    correct: list[Any] = [None] * len(chosen)
    if problems is not None:
        from kat_diag.data.grading import check_answer
        from kat_diag.world.truth import truth_columns

        probs = problems[: len(chosen)]
        token_text = [tokenizer.batch_decode([[t] for t in r.token_ids.tolist()]) for r in chosen]
        truth = truth_columns(probs, texts, token_text)
        correct = [check_answer(p, t) for p, t in zip(probs, texts, strict=True)]
    for j, r in enumerate(chosen):
        ids = r.token_ids.tolist()
        rows.append({
            "rollout_id": f"step{step}-{r.index}", "step": step, "policy": policy, "tau": tau,
            "onset": r.onset, "fire": r.fire, "stop_reason": r.stop_reason, "gen_len": r.gen_len,
            "kept_len": r.keep, "token_ids": np.asarray(ids), "token_text": tokenizer.batch_decode([[t] for t in ids]),
            "text": texts[j], "correct": correct[j], "kat": kat,
            **{k: v[j] for k, v in truth.items()},
            **{k: getattr(r, k).float().cpu().numpy() for k in ("kl", "kl_sampled", "student_logprob",
                                                                 "teacher_logprob", "student_entropy")},
            "teacher_top_ids": r.teacher_top_ids.cpu().numpy(), "teacher_top_probs": r.teacher_top_probs.cpu().numpy(),
        })
    return rows


def rollout_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One line per rollout for the trackers' tables: id, step, verdict, fired, onset, fire, kept and
    generated length, tau, first error, loop start, the student's answer (None where unknown)."""
    from kat_diag.views.track import student_answer, verdict_of

    def pos(v: Any) -> Any:
        return None if v is None or int(v) < 0 else int(v)

    data = []
    for r in rows:
        tau = r.get("tau")
        data.append([str(r.get("rollout_id")), int(r.get("step", -1)), verdict_of(r), bool(int(r.get("fire", -1)) >= 0),
                     pos(r.get("onset")), pos(r.get("fire")), int(r.get("kept_len", 0)), int(r.get("gen_len", 0)),
                     None if tau is None or not math.isfinite(float(tau)) else float(tau), pos(r.get("first_error")),
                     pos(r.get("loop_start")), student_answer(r.get("text"))])
    return list(TABLE_COLUMNS), data


def table_markdown(columns: list[str], data: list[list[Any]]) -> str:
    """The table as Markdown (TensorBoard's text plugin renders it)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


class Tracker:
    """One backend. Metrics are plain dicts at a step; rollouts are trace rows (the step's rollouts:
    a table of all of them, the rendering of the first ROLLOUTS_LOGGED)."""

    name = "none"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_rollouts(self, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MultiTracker(Tracker):
    """Fans out to every selected backend (an empty one does nothing: `--report-to none`)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_rollouts(self, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            for t in self.trackers:
                t.log_rollouts(rows, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--report-to {extra} needs the {extra} package: pip install 'kat-diag[{extra}]'") from None


def _track(row: dict[str, Any]) -> Any:
    """The window track of a logged rollout under the run's KAT settings (row["kat"]), or None."""
    cfg = row.get("kat")
    if cfg is None:
        return None
    from kat_diag.views.track import window_track

    return window_track(row, cfg)


def _rollout_text(row: dict[str, Any]) -> str:
    from kat_diag.views.terminal import render_terminal

    return render_terminal(row, color=False, track=_track(row))


def _rollout_html(row: dict[str, Any]) -> str:
    from kat_diag.views.html import render_html

    return render_html(row, track=_track(row))


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard (torch's SummaryWriter); rollouts as text (TB shows no HTML)."""

    name = "tensorboard"

    def __init__(self, run: Path, state: dict[str, Any], start_step: int):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        logdir = run / state.setdefault("logdir", "tensorboard")  # relative to the run: the run dir may move
        # purge_step: on resume, events of the steps being redone are hidden, like metrics.jsonl's truncation.
        self.writer = SummaryWriter(str(logdir), purge_step=start_step if start_step > 0 else None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_rollouts(self, rows: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text("rollouts/table", table_markdown(*rollout_table(rows)), step)
        for i, row in enumerate(rows[:ROLLOUTS_LOGGED]):
            # Markdown: a 4-space indent keeps the token separators and line breaks verbatim.
            text = "\n".join("    " + ln for ln in _rollout_text(row).splitlines())
            self.writer.add_text(f"rollouts/{i}", text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioTracker(Tracker):
    """trackio's local store (no server is started); rollouts as `trackio.Html` (the inspect page)."""

    name = "trackio"

    def __init__(self, run: Path, state: dict[str, Any], config: dict[str, Any], project: str):
        self.trackio = _require("trackio", "trackio")
        state.setdefault("project", project)
        state.setdefault("name", f"{run.name}-{secrets.token_hex(3)}")
        with _stdout_to_stderr():  # trackio prints a banner; stdout is the command's JSON result
            self.run = self.trackio.init(project=state["project"], name=state["name"], config=config,
                                         resume="allow", embed=False, auto_log_gpu=False, auto_log_cpu=False)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(scalars(metrics), step=step)

    def log_rollouts(self, rows: list[dict[str, Any]], step: int) -> None:
        columns, data = rollout_table(rows)
        logged: dict[str, Any] = {"rollouts/table": self.trackio.Table(columns=columns, data=data)}
        logged.update({f"rollouts/{i}": self.trackio.Html(_rollout_html(row))
                       for i, row in enumerate(rows[:ROLLOUTS_LOGGED])})
        self.run.log(logged, step=step)

    def close(self) -> None:
        with _stdout_to_stderr():
            try:
                # The module-level finish also clears trackio's current run: `run.finish()` alone
                # leaves it to trackio's exit hook, which finishes it again and prints on stdout.
                self.trackio.finish()
            except RuntimeError:  # not the current run any more
                self.run.finish()


class WandbTracker(Tracker):
    """Weights & Biases; offline with WANDB_MODE=offline. Rollouts as `wandb.Html`."""

    name = "wandb"

    def __init__(self, run: Path, state: dict[str, Any], config: dict[str, Any], project: str):
        self.wandb = _require("wandb", "wandb")
        state.setdefault("project", project)
        state.setdefault("id", secrets.token_hex(4))
        with _stdout_to_stderr():
            self.run = self.wandb.init(project=state["project"], id=state["id"], name=run.name, resume="allow",
                                       dir=str(run), config=config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(scalars(metrics), step=step)

    def log_rollouts(self, rows: list[dict[str, Any]], step: int) -> None:
        columns, data = rollout_table(rows)
        logged: dict[str, Any] = {"rollouts/table": self.wandb.Table(columns=columns, data=data)}
        logged.update({f"rollouts/{i}": self.wandb.Html(_rollout_html(row))
                       for i, row in enumerate(rows[:ROLLOUTS_LOGGED])})
        self.run.log(logged, step=step)

    def close(self) -> None:
        with _stdout_to_stderr():
            self.run.finish()


def _stdout_to_stderr() -> Any:
    """Backends' banners and links go to stderr: a command's stdout is its strict-JSON result."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)


def make_tracker(report_to: tuple[str, ...], run: Path, config: dict[str, Any], *, resumed: bool,
                 start_step: int = 0, project: str = "kat-diag") -> Tracker:
    """The trackers of a run; on resume, each reattaches to the run recorded in RUN/tracking.json."""
    names = parse_report_to(list(report_to))
    if not names:
        return MultiTracker([])
    check_report_to(names)  # all of them before any starts
    path = run / STATE_NAME
    saved = json.loads(path.read_text()) if resumed and path.exists() else {}
    state = {n: dict(saved.get(n, {})) for n in names}
    trackers: list[Tracker] = []
    for n in names:
        if n == "tensorboard":
            trackers.append(TensorBoardTracker(run, state[n], start_step))
        elif n == "trackio":
            trackers.append(TrackioTracker(run, state[n], config, project))
        else:
            trackers.append(WandbTracker(run, state[n], config, project))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**saved, **state}, indent=2))
    os.replace(tmp, path)
    return MultiTracker(trackers)
