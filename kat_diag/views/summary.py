"""A store at a glance: per-policy summary and the list of rollouts, read from scalar columns only.

`kat-diag inspect RUN` and `--list` print these; they never read per-token columns, so they answer
in seconds on a store of any size.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from kat_diag.traces.reader import TraceReader
from kat_diag.views.text import _fmt, _printable, format_table

SUMMARY_COLUMNS = ["step", "policy", "fire", "onset", "gen_len", "kept_len", "correct", "stop_reason"]


# --------------------------------------------------------------------------------------------------
# Summary


class _Acc:
    """Running sums for one group of rollouts (one policy, or all)."""

    def __init__(self) -> None:
        self.rollouts = self.tokens = self.fired = self.kept = self.graded = self.correct = 0
        self.onset_sum = self.stopped = 0
        self.steps: set[int] = set()

    def add(self, b: Any, sel: np.ndarray) -> None:
        fire = b["fire"][sel]
        fired = fire >= 0
        correct = b["correct"][sel]
        self.rollouts += int(sel.sum())
        self.tokens += int(b["gen_len"][sel].sum())
        self.kept += int(b["kept_len"][sel].sum())
        self.fired += int(fired.sum())
        self.stopped += int((b["stop_reason"][sel] == "policy").sum())  # KAT, prefix, random: every policy stop
        self.onset_sum += int(b["onset"][sel][fired].sum())
        self.graded += int((correct >= 0).sum())
        self.correct += int((correct == 1).sum())
        self.steps.update(np.unique(b["step"][sel]).tolist())

    def as_dict(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "rollouts": self.rollouts,
            "tokens": self.tokens,
            "steps": len(self.steps),
            "first_step": min(self.steps) if self.steps else None,
            "last_step": max(self.steps) if self.steps else None,
            "fired_share": ratio(self.fired, self.rollouts),
            "stopped_share": ratio(self.stopped, self.rollouts),
            "mean_onset": ratio(self.onset_sum, self.fired),
            "mean_gen_len": ratio(self.tokens, self.rollouts),
            "mean_kept_len": ratio(self.kept, self.rollouts),
            "kept_ratio": ratio(self.kept, self.tokens),
            "graded": self.graded,
            "accuracy": ratio(self.correct, self.graded),
        }


def summarize(reader: TraceReader, **filters: Any) -> dict[str, Any]:
    """Summary of the (filtered) store, reading only per-rollout scalar columns.

    ``stopped_share`` counts every stop by the termination policy (KAT fires, prefix budgets,
    random cuts); ``fired_share`` only KAT fires; ``mean_onset`` is over fired rollouts;
    ``kept_ratio`` is kept tokens / generated tokens;
    ``accuracy`` is over graded rollouts. Values that are undefined (no rollouts, none fired, none
    graded) are None, so the dict serialises to strict JSON.
    """
    total = _Acc()
    per_policy: dict[str, _Acc] = {}
    stops: Counter[str] = Counter()
    for b in reader.iter_batches(SUMMARY_COLUMNS, **filters):
        total.add(b, np.ones(b.num_rows, dtype=bool))
        for policy in np.unique(b["policy"]).tolist():
            per_policy.setdefault(policy, _Acc()).add(b, b["policy"] == policy)
        stops.update(b["stop_reason"].tolist())
    out = {
        "store": str(reader.dir),
        "run": reader.manifest.get("run"),
        "schema_version": reader.manifest.get("schema_version"),
        "files": len(reader.files),
        **total.as_dict(),
        "stop_reasons": dict(sorted(stops.items())),
        "policies": {name: acc.as_dict() for name, acc in sorted(per_policy.items())},
        "skipped_files": [str(p) for p, _ in reader.skipped],
    }
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as text: a header line, one table row per policy and one for all rollouts."""
    headers = ["policy", "rollouts", "tokens", "steps", "stopped", "mean onset", "mean gen", "mean kept",
               "kept/gen", "accuracy"]

    def row(name: str, s: dict[str, Any]) -> list[str]:
        steps = "-" if s["first_step"] is None else f"{s['first_step']}..{s['last_step']} ({s['steps']})"
        return [_printable(name), _fmt(s["rollouts"]), _fmt(s["tokens"]), steps, _fmt(s["stopped_share"], "pct"),
                _fmt(s["mean_onset"], "len"), _fmt(s["mean_gen_len"], "len"), _fmt(s["mean_kept_len"], "len"),
                _fmt(s["kept_ratio"], "pct"), _fmt(s["accuracy"], "pct")]

    rows = [row(name, s) for name, s in summary["policies"].items()]
    if len(rows) != 1:
        rows.append(row("all", summary))
    head = _printable(f"trace store {summary['store']}  run={summary['run']}  schema v{summary['schema_version']}  "
                      f"files={summary['files']}")
    stops = _printable(", ".join(f"{k}: {v}" for k, v in summary["stop_reasons"].items())) or "-"
    parts = [head, "", format_table(headers, rows), "", f"stop reasons: {stops}",
             "(stopped: share of rollouts ended by the termination policy; mean onset: KAT fires only)"]
    if summary["skipped_files"]:
        parts.append(f"skipped (unreadable): {', '.join(summary['skipped_files'])}")
    return "\n".join(parts)


LIST_COLUMNS = ["rollout_id", "step", "rank", "policy", "prompt_id", "correct", "gen_len", "kept_len", "onset", "fire",
                "tau", "stop_reason", "verdict", "first_error"]
LIST_SORT_KEYS = ("step", "onset", "fire", "tau", "min_window", "length", "kept", "verdict", "first_error")
VERDICT_ORDER = ("wrong", "loop", "unfinished", "right", "ungraded")


def rollout_list(reader: TraceReader, window: int | None = None, **filters: Any) -> list[dict[str, Any]]:
    """One dict per (filtered) rollout: id, its step/rank/index address, policy, prompt, verdict,
    length, kept, onset, fire, tau, first error, stop reason; with ``window`` also the minimum window
    mean of its KL (the statistic KAT's buffer holds; this reads the ``kl`` column, batch by batch)."""
    from kat_diag.views.rollout import rollout_address
    from kat_diag.views.track import verdicts

    cols = list(LIST_COLUMNS) + (["kl"] if window else [])
    rows: list[dict[str, Any]] = []
    for b in reader.iter_batches(cols, **filters):
        v = verdicts(b["verdict"], b["correct"], b["stop_reason"])
        mins = None
        if window:
            from kat_diag.kat.detector import rollout_minima

            mins = rollout_minima(b["kl"].values, b["kl"].offsets, window)
        for i in range(b.num_rows):
            c = int(b["correct"][i])
            rid = int(b["rollout_id"][i])
            addr = rollout_address(rid)
            tau = float(b["tau"][i])
            fe = int(b["first_error"][i])
            rows.append({"rollout_id": rid, "step": int(b["step"][i]), "rank": int(b["rank"][i]),
                         "index": None if addr is None else addr[2],
                         "policy": str(b["policy"][i]), "prompt_id": str(b["prompt_id"][i]),
                         "correct": None if c < 0 else bool(c), "verdict": str(v[i]), "gen_len": int(b["gen_len"][i]),
                         "kept_len": int(b["kept_len"][i]), "onset": int(b["onset"][i]), "fire": int(b["fire"][i]),
                         "tau": tau if tau == tau else None,
                         "min_window": None if mins is None or mins[i] != mins[i] else float(mins[i]),
                         "first_error": None if fe == -2 else fe, "stop_reason": str(b["stop_reason"][i])})
    rows.sort(key=lambda r: (r["step"], r["rollout_id"]))
    return rows


def filter_rows(rows: list[dict[str, Any]], verdict: list[str] | None = None, fired: bool | None = None
                ) -> list[dict[str, Any]]:
    """Rows whose verdict is one of ``verdict`` and whose fired state (fire >= 0) is ``fired``."""
    out = rows
    if verdict:
        want = set(verdict)
        out = [r for r in out if r["verdict"] in want]
    if fired is not None:
        out = [r for r in out if (r["fire"] >= 0) == fired]
    return out


def sort_rows(rows: list[dict[str, Any]], key: str = "step", descending: bool = False) -> list[dict[str, Any]]:
    """Rows ordered by ``key`` (LIST_SORT_KEYS); rows without a value (not fired, no tau) go last
    either way; ties by step and id."""
    if key not in LIST_SORT_KEYS:
        raise ValueError(f"--sort must be one of {', '.join(LIST_SORT_KEYS)}, got {key!r}")

    def value(r: dict[str, Any]) -> Any:
        if key == "verdict":
            return VERDICT_ORDER.index(r["verdict"]) if r["verdict"] in VERDICT_ORDER else len(VERDICT_ORDER)
        v = {"length": r["gen_len"], "kept": r["kept_len"]}.get(key, r.get(key))
        if key in ("onset", "fire", "first_error") and v is not None and v < 0:
            return None
        return v

    have = [r for r in rows if value(r) is not None]
    missing = [r for r in rows if value(r) is None]
    have.sort(key=lambda r: (r["step"], r["rollout_id"]))
    have.sort(key=value, reverse=descending)
    return have + missing


def format_list(rows: list[dict[str, Any]], problems: dict[str, Any] | None = None) -> str:
    """The rollout list as a table (prompt text when the run's data is available)."""
    problems = problems or {}
    headers = ["rollout", "step/index", "policy", "prompt", "verdict", "length", "kept", "onset", "fire", "tau",
               "min z", "1st err", "stop"]

    def prompt(pid: str) -> str:
        p = problems.get(pid)
        text = pid if p is None else f"{pid}: {' '.join(p.prompt.split())}"
        return text if len(text) <= 40 else text[:39] + "…"

    def pos(v: int | None) -> str:
        return "-" if v is None or v < 0 else str(v)

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    body = [[str(r["rollout_id"]),
             f"{r['step']}/{r['index']}" + (f"@{r['rank']}" if r.get("rank") else "") if r.get("index") is not None
             else str(r["step"]),
             _printable(r["policy"]), _printable(prompt(r["prompt_id"])), _printable(r["verdict"]), str(r["gen_len"]),
             str(r["kept_len"]), pos(r["onset"]), pos(r["fire"]), num(r["tau"]), num(r.get("min_window")),
             pos(r["first_error"]), _printable(r["stop_reason"])]
            for r in rows]
    return format_table(headers, body)
