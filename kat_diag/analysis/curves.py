"""Training curves of several runs overlaid, from their `metrics.jsonl`.

Comparing OPD with KAT (or a random or prefix baseline) starts with the curves the trainer logs per
step: mean reverse KL, the KAT threshold tau, generated and kept rollout length, the share of
rollouts KAT stopped, and the evaluation accuracy logged every ``--eval-every`` steps. Training
lines carry ``loss``; evaluation lines carry ``eval/<split>/<metric>`` keys (``split`` = ``mean`` for
the mean over splits; ``eval/<split>/n``: problems). The x axis counts updates done: a training
line of step s describes rollouts sampled after s updates, an evaluation after step s was taken
after s + 1, and the baseline (``--eval-at-start``, logged as step -1) at 0.

Noisy per-step curves are drawn faint with a *trailing* rolling mean on top (a centred one would
draw values before they exist, e.g. tau during KAT's warm-up). Evaluation points carry a 95 % Wilson
interval over problems (conservative for avg@k and pass@k: a per-problem share in [0, 1] has at
most the variance of a coin with the same mean). Each run has its method's colour; avg@k and
pass@k differ in marker and line style.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_KEYS = ("kl_mean", "tau", "gen_len_mean", "kept_len_mean", "fired_share", "loss", "step_time")


@dataclass(frozen=True)
class RunCurves:
    """One run's per-step training metrics and its evaluation points (float64 arrays, NaN = missing)."""

    name: str
    train_step: np.ndarray
    train: dict[str, np.ndarray]
    eval_step: np.ndarray
    eval: dict[str, np.ndarray]

    def summary(self, last: int = 10) -> dict[str, Any]:
        """Means over the last ``last`` training steps and the final evaluation."""
        out: dict[str, Any] = {"steps": int(self.train_step.size)}
        for k, v in self.train.items():
            tail = v[-last:]
            out[f"{k} (last {last} steps)"] = float(np.nanmean(tail)) if np.isfinite(tail).any() else None
        for k, v in self.eval.items():
            if k.startswith("eval/mean/") and v.size and np.isfinite(v[-1]):
                out[f"{k} (step {int(self.eval_step[-1])})"] = float(v[-1])
        return out


def read_metrics(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """Parse ``RUN/metrics.jsonl`` (JSON nulls = NaN); a missing file is a clear error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a run directory?)")
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from None
        if any(k.startswith("eval/") for k in rec):
            evals.append(rec)
        elif "loss" in rec:
            train.append(rec)
    # A resumed run may log a step twice: keep the last line of each step.
    train = list({int(r["step"]): r for r in train}.values())
    evals = list({int(r["step"]): r for r in evals}.values())

    def col(recs: list[dict[str, Any]], key: str) -> np.ndarray:
        return np.array([math.nan if r.get(key) is None else float(r[key]) for r in recs], dtype=np.float64)

    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    return RunCurves(
        name=name or Path(run_dir).resolve().name,
        train_step=col(train, "step"), train={k: col(train, k) for k in TRAIN_KEYS if any(k in r for r in train)},
        eval_step=col(evals, "step"), eval={k: col(evals, k) for k in eval_keys},
    )


def rolling_mean(v: np.ndarray, window: int) -> np.ndarray:
    """Trailing rolling mean over the last ``window`` values, ignoring NaN; NaN where the value
    itself is NaN (nothing is drawn where nothing was measured)."""
    v = np.asarray(v, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v.copy()
    ok = np.isfinite(v)
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    cc = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(v.size)
    lo = np.maximum(idx + 1 - window, 0)
    s = cs[idx + 1] - cs[lo]
    c = cc[idx + 1] - cc[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok & (c > 0), s / np.maximum(c, 1), np.nan)


def eval_n(curves: RunCurves) -> np.ndarray:
    """Problems behind each evaluation's mean over splits (sum of the logged eval/<split>/n; NaN if
    the run did not log them)."""
    keys = [k for k in curves.eval if k.endswith("/n") and not k.startswith("eval/mean/")]
    if not keys:
        return np.full(curves.eval_step.shape, np.nan)
    return np.sum([curves.eval[k] for k in keys], axis=0)


def long_table(runs: list[RunCurves]) -> list[dict[str, Any]]:
    """All curves as rows (run, kind, step, metric, value) for the CSV."""
    rows = []
    for r in runs:
        for k, v in r.train.items():
            rows += [{"run": r.name, "kind": "train", "step": int(s), "metric": k, "value": float(x)}
                     for s, x in zip(r.train_step, v, strict=True)]
        for k, v in r.eval.items():
            rows += [{"run": r.name, "kind": "eval", "step": int(s), "metric": k, "value": float(x)}
                     for s, x in zip(r.eval_step, v, strict=True)]
    return rows


def _eval_metric(runs: list[RunCurves], kind: str) -> str | None:
    """The ``eval/mean/<kind>@k`` key present in the runs (k as logged)."""
    keys = sorted({k for r in runs for k in r.eval if k.startswith(f"eval/mean/{kind}")})
    return keys[0] if keys else None


def plot(runs: list[RunCurves], fig: Any = None, smooth: int = 9) -> Any:
    """Six panels: KL, tau, generated/kept length, fired share, eval accuracy (95 % Wilson), step time."""
    from matplotlib.lines import Line2D

    from kat_diag.analysis import style
    from kat_diag.analysis.stats import wilson

    if fig is None:
        fig, axes = style.figure(2, 3, size=(style.TEXT_WIDTH, 4.9))
    else:
        axes = np.array(fig.subplots(2, 3))
    (a_kl, a_tau, a_len), (a_fire, a_eval, a_time) = axes
    colors = [style.method_color(r.name, i) for i, r in enumerate(runs)]

    def line(ax: Any, r: RunCurves, key: str, color: str, label: str, **kw: Any) -> None:
        v = r.train.get(key)
        if v is None or not np.isfinite(v).any():
            return
        ax.plot(r.train_step, v, color=color, alpha=0.2, linewidth=0.6, **kw)
        ax.plot(r.train_step, rolling_mean(v, smooth), color=color, linewidth=1.3, label=label, **kw)

    metric_style = {"avg@": ("-", "o"), "pass@": ("--", "s")}
    for r, c in zip(runs, colors, strict=True):
        line(a_kl, r, "kl_mean", c, r.name)
        line(a_tau, r, "tau", c, r.name)
        line(a_len, r, "gen_len_mean", c, r.name)
        line(a_len, r, "kept_len_mean", c, "", linestyle="--")
        line(a_fire, r, "fired_share", c, r.name)
        line(a_time, r, "step_time", c, r.name)
        n = eval_n(r)
        x = r.eval_step + 1  # updates done
        for kind, (ls, mk) in metric_style.items():
            key = _eval_metric([r], kind)
            if not key or not r.eval_step.size:
                continue
            v = r.eval[key]
            a_eval.plot(x, v, color=c, linestyle=ls, marker=mk, markersize=3.5, markerfacecolor=c if ls == "-"
                        else style.PAPER)
            lo, hi = wilson(v * n, n)
            if np.isfinite(lo).any():
                a_eval.fill_between(x, lo, hi, color=c, alpha=0.12, linewidth=0)
    for ax, title, ylabel in (
        (a_kl, "mean reverse KL per token", "nats"),
        (a_tau, "KAT threshold tau", "nats"),
        (a_len, "rollout length (dashed: kept)", "tokens"),
        (a_fire, "rollouts stopped by the policy", "share"),
        (a_eval, "evaluation (mean over splits)", "accuracy"),
        (a_time, "wall-clock per step", "seconds"),
    ):
        ax.set_title(title)
        ax.set_xlabel("updates done")
        ax.set_ylabel(ylabel)
        if not ax.get_lines():
            msg = "tau undefined in these runs\n(no KAT, or still warming up)" if ax is a_tau else "not logged"
            ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color=style.MUTED, fontsize=7)
    a_fire.set_ylim(-0.02, 1.02)
    a_eval.set_ylim(0, 1)
    run_handles = [Line2D([], [], color=c, linewidth=2, label=r.name) for r, c in zip(runs, colors, strict=True)]
    metric_handles = []
    for kind, (ls, mk) in metric_style.items():
        key = _eval_metric(runs, kind)
        if key:
            metric_handles.append(Line2D([], [], color=style.INK, linestyle=ls, marker=mk, markersize=3.5,
                                         markerfacecolor=style.INK if ls == "-" else style.PAPER,
                                         label=key.split("/")[-1]))
    fig.legend(handles=run_handles + metric_handles, loc="lower center", ncol=len(run_handles) + len(metric_handles),
               fontsize=7, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"Training curves\nfaint: per step; solid: trailing {smooth}-step mean; eval at 0: untrained "
                 "student; bands: 95 % Wilson", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def run_curves(run_dirs: list[str | Path], out_dir: str | Path, names: list[str] | None = None) -> dict[str, Any]:
    """Write ``curves.png`` and ``curves.csv`` for these runs; returns per-run summaries and paths."""
    from kat_diag.analysis import style
    from kat_diag.analysis.output import clean, write_csv

    names = names or unique_names(run_dirs)
    runs = [read_metrics(d, n) for d, n in zip(run_dirs, names, strict=True)]
    out = Path(out_dir)
    png = style.save(plot(runs), out / "curves.png")
    csv_path = write_csv(out / "curves.csv", long_table(runs))
    return clean({"runs": [{"run": r.name, **r.summary()} for r in runs], "files": [str(png), str(csv_path)]})


def unique_names(run_dirs: list[str | Path]) -> list[str]:
    """Directory names, made unique with a numeric suffix when two runs share one."""
    names: list[str] = []
    for d in run_dirs:
        base = Path(d).resolve().name
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names
