"""How good is KAT's detection? A grid over its parameters, scored against ground truth and against
reference detectors on the same rollouts (`kat-diag trap STORE --sweep`).

`kat-diag trap` scores one KAT configuration. Whether a configuration is good depends on what it
gives up: firing on more wrong rollouts costs firing on right ones. This module replays, on one
store of full rollouts (e.g. `kat-diag record`), every configuration of a grid over W, T, L0, the
tau quantile and both buffer statistics, and scores each with the same numbers:

* `fire_wrong`, `fire_right`: share of wrong / right rollouts it fires on (the frontier's axes);
* `onset_after_error`: share of fired wrong rollouts whose onset is at or after the first error
  (world ground truth), and `onset_lag_median`: median onset minus first error, in tokens;
* `tokens_cut`: share of all generated tokens not trained on; `right_tokens_cut`: of right rollouts';
* `fire_loop`, `fire_wrong_no_loop`: on rollouts that loop, and on wrong ones that do not.

The same scores for the reference detectors (`kat_diag.analysis.reference_detectors`): an n-gram
repetition check (no teacher) over n and the repeat count, a plain length cut (no signal: the
prefix budget) over L, and KAT's own rule on the student's entropy or the teacher's entropy
instead of the KL, over the same grid. `frontier` keeps the
Pareto-best configurations of each detector (most wrong fired for the right fired), `matched`
reads each frontier at a given fire rate on right rollouts (KAT's preset's), and
`plot_frontier` draws fire on wrong vs fire on right with the paper and world presets marked.

The store is its own threshold buffer (tau = the quantile of its rollouts' buffer values), as in
`kat-diag trap` on one step: warm-up K and B_min do not apply (the presets are scored with B_min 1,
since a 400-rollout store holds fewer values than the paper's B_min 512). Multi-step stores replay
the buffer step by step as in `trap`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kat_diag.analysis.reference_detectors import (
    DetectorResult,
    length_cut,
    ngram_repeat,
    signal_rule,
    teacher_entropy_topn,
)
from kat_diag.kat.config import KATConfig

SIGNALS = ("kl", "student_entropy", "teacher_entropy")  # "kl" is KAT
DETECTOR_LABELS = {"kl": "KAT (teacher-student KL)", "student_entropy": "student entropy (KAT's rule)",
                   "teacher_entropy": "teacher entropy (KAT's rule)", "ngram": "n-gram repetition (no teacher)",
                   "length": "length cut (no signal)"}
SCORE_KEYS = ("fire_wrong", "fire_right", "fire_loop", "fire_wrong_no_loop", "onset_after_error",
              "onset_lag_median", "tokens_cut", "right_tokens_cut")


@dataclass(frozen=True)
class SweepGrid:
    """The grid of the sweep (every combination; KAT's and the entropy rules' share it)."""

    windows: tuple[int, ...] = (4, 8, 16, 32, 64)
    persistences: tuple[int, ...] = (1, 2, 4, 8, 16)
    min_lengths: tuple[int, ...] = (0, 16, 32, 64, 128)
    quantiles: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9)
    statistics: tuple[str, ...] = ("rollout_min", "windows")
    signals: tuple[str, ...] = SIGNALS
    ngram_ns: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48)
    ngram_counts: tuple[int, ...] = (1, 2, 3)
    length_budgets: tuple[int, ...] = (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160)

    def __post_init__(self) -> None:
        bad = [s for s in self.signals if s not in SIGNALS]
        if bad:
            raise ValueError(f"sweep: unknown signal(s) {bad}; choose from {list(SIGNALS)}")
        for name in ("windows", "persistences", "ngram_ns", "ngram_counts", "length_budgets"):
            if any(int(v) < 1 for v in getattr(self, name)):
                raise ValueError(f"sweep: {name} must be >= 1, got {getattr(self, name)}")
        if any(int(v) < 0 for v in self.min_lengths):
            raise ValueError(f"sweep: min_lengths must be >= 0, got {self.min_lengths}")
        if any(not 0 < q < 1 for q in self.quantiles):
            raise ValueError(f"sweep: quantiles must be in (0, 1), got {self.quantiles}")

    def kat_configs(self) -> list[KATConfig]:
        return [KATConfig(window=w, persistence=t, min_length=l0, tau_quantile=q, statistic=st,
                          warmup_steps=0, min_fill=1)
                for w, t, l0, q, st in itertools.product(self.windows, self.persistences, self.min_lengths,
                                                         self.quantiles, self.statistics)]


@dataclass(frozen=True)
class SweepData:
    """What the sweep reads of a store: ragged per-token signals on one set of offsets, and per rollout
    correctness, step, first error and loop start (-1 none)."""

    offsets: np.ndarray
    signals: dict[str, np.ndarray]  # name -> flat per-token values
    token_ids: np.ndarray
    correct: np.ndarray
    steps: np.ndarray
    first_error: np.ndarray | None
    loop_start: np.ndarray | None


def load_sweep_data(store: str | Path, *, allow_foreign: bool = False) -> SweepData:
    """Read a trace store (run directory or store path) for the sweep; needs graded rollouts
    (allow_foreign: read files of other runs, see `TraceReader`)."""
    from kat_diag.traces.reader import TraceReader
    from kat_diag.traces.schema import UNKNOWN_POSITION

    columns = ["kl", "student_entropy", "teacher_top_probs", "token_ids", "correct", "step", "first_error",
               "loop_start"]
    b = TraceReader(store, allow_foreign=allow_foreign).read(columns=columns)
    kl = b["kl"]
    offs = np.asarray(kl.offsets, dtype=np.int64)
    for col in ("student_entropy", "teacher_top_probs", "token_ids"):
        if not np.array_equal(np.asarray(b[col].offsets), offs):
            raise ValueError(f"{store}: column {col} is not aligned with kl")
    graded = np.asarray(b["correct"]) >= 0
    if not graded.all():
        raise ValueError(f"{store}: {int((~graded).sum())} rollouts are not graded (correct is null)")
    err, loop = np.asarray(b["first_error"], dtype=np.int64), np.asarray(b["loop_start"], dtype=np.int64)
    if (err == UNKNOWN_POSITION).any():
        err = loop = None  # real data: no ground truth
    top = np.asarray(b["teacher_top_probs"].values)
    return SweepData(
        offsets=offs,
        signals={"kl": np.asarray(kl.values, dtype=np.float64),
                 "student_entropy": np.asarray(b["student_entropy"].values, dtype=np.float64),
                 "teacher_entropy": teacher_entropy_topn(top.reshape(len(top), -1))},
        token_ids=np.asarray(b["token_ids"].values, dtype=np.int64), correct=np.asarray(b["correct"]) == 1,
        steps=np.asarray(b["step"], dtype=np.int64), first_error=err, loop_start=loop)


def _median(x: np.ndarray) -> float:
    return float(np.nanmedian(x)) if np.isfinite(x).any() else float("nan")


def _share(x: np.ndarray, sel: np.ndarray) -> float:
    return float(np.mean(x[sel])) if sel.any() else float("nan")


def score(det: DetectorResult, correct: np.ndarray, first_error: np.ndarray | None = None,
          loop_start: np.ndarray | None = None) -> dict[str, float]:
    """The sweep's numbers (module doc) of one detector's decisions on graded rollouts."""
    correct = np.asarray(correct, dtype=bool)
    wrong = ~correct
    fired = det.fire >= 0
    length = np.asarray(det.length, dtype=np.int64)
    cut = length - np.asarray(det.keep, dtype=np.int64)
    out = {"fire_wrong": _share(fired, wrong), "fire_right": _share(fired, correct),
           "fire_all": float(fired.mean()) if len(fired) else float("nan"),
           "tokens_cut": float(cut.sum() / max(1, int(length.sum()))),
           "right_tokens_cut": float(cut[correct].sum() / max(1, int(length[correct].sum()))),
           "fire_loop": float("nan"), "fire_wrong_no_loop": float("nan"),
           "onset_after_error": float("nan"), "onset_lag_median": float("nan")}
    if first_error is not None:
        err = np.asarray(first_error, dtype=np.int64)
        sel = fired & wrong & (err >= 0)
        out["onset_after_error"] = _share(det.onset >= err, sel)
        out["onset_lag_median"] = float(np.median(det.onset[sel] - err[sel])) if sel.any() else float("nan")
    if loop_start is not None:
        loop = np.asarray(loop_start, dtype=np.int64) >= 0
        out["fire_loop"] = _share(fired, loop)
        out["fire_wrong_no_loop"] = _share(fired, wrong & ~loop)
    return out


def kat_params(cfg: KATConfig) -> dict[str, Any]:
    return {"W": cfg.window, "T": cfg.persistence, "L0": cfg.min_length, "q": cfg.tau_quantile,
            "statistic": cfg.statistic}


def run_sweep(data: SweepData, grid: SweepGrid | None = None) -> list[dict[str, Any]]:
    """One row per (detector, configuration): `detector` (a signal name or "ngram"), `params`, and
    `score`'s numbers (plus `tau`, the median threshold, for the signal rules)."""
    grid = grid or SweepGrid()
    rows: list[dict[str, Any]] = []
    truth = (data.correct, data.first_error, data.loop_start)
    for sig in grid.signals:
        values = data.signals[sig]
        for cfg in grid.kat_configs():
            det, tau = signal_rule(values, data.offsets, cfg, data.steps)
            rows.append({"detector": sig, "params": kat_params(cfg), "tau": _median(tau), **score(det, *truth)})
    for n, c in itertools.product(grid.ngram_ns, grid.ngram_counts):
        det = ngram_repeat(data.token_ids, data.offsets, n, c)
        rows.append({"detector": "ngram", "params": {"n": n, "count": c}, **score(det, *truth)})
    for budget in grid.length_budgets:
        rows.append({"detector": "length", "params": {"L": budget}, **score(length_cut(data.offsets, budget), *truth)})
    return rows


def preset_rows(data: SweepData) -> dict[str, dict[str, Any]]:
    """KAT at the world and paper presets (B_min 1 and no warm-up: the store is its own buffer)."""
    from kat_diag.kat.config import KAT_PRESETS

    out = {}
    for name, cfg in KAT_PRESETS.items():
        c = dataclasses.replace(cfg, warmup_steps=0, min_fill=1)
        det, tau = signal_rule(data.signals["kl"], data.offsets, c, data.steps)
        out[name] = {"detector": "kl", "params": kat_params(c), "tau": _median(tau),
                     **score(det, data.correct, data.first_error, data.loop_start)}
    return out


def frontier(rows: Sequence[dict[str, Any]], detector: str) -> list[dict[str, Any]]:
    """The Pareto-best rows of one detector: no other row fires on at least as many wrong rollouts
    while firing on fewer right ones (ties: the one cutting fewer right tokens). Sorted by fire_right."""
    mine = [r for r in rows if r["detector"] == detector and np.isfinite(r["fire_right"])
            and np.isfinite(r["fire_wrong"])]
    mine.sort(key=lambda r: (r["fire_right"], -r["fire_wrong"], r["right_tokens_cut"]))
    out: list[dict[str, Any]] = []
    best = -1.0
    for r in mine:
        if r["fire_wrong"] > best:
            out.append(r)
            best = r["fire_wrong"]
    return out


def matched(rows: Sequence[dict[str, Any]], detector: str, max_fire_right: float) -> dict[str, Any] | None:
    """The row of `detector` that fires on the most wrong rollouts with fire_right <= max_fire_right."""
    ok = [r for r in frontier(rows, detector) if r["fire_right"] <= max_fire_right + 1e-12]
    return ok[-1] if ok else None


def sweep_report(store: str | Path, grid: SweepGrid | None = None, label: str | None = None, *,
                 allow_foreign: bool = False) -> dict[str, Any]:
    """The whole sweep of one store: rollouts, accuracy, the grid, every row, presets, each detector's
    frontier, and each detector's best row at KAT's world and paper presets' fire rates on right rollouts."""
    grid = grid or SweepGrid()
    data = load_sweep_data(store, allow_foreign=allow_foreign)
    rows = run_sweep(data, grid)
    presets = preset_rows(data)
    detectors = [*grid.signals, "ngram", "length"]
    at = {name: {d: matched(rows, d, p["fire_right"]) for d in detectors} for name, p in presets.items()}
    n = len(data.offsets) - 1
    return {"store": str(store), "label": label or Path(store).name, "rollouts": n,
            "accuracy": float(data.correct.mean()) if n else float("nan"),
            "loop_share": float((data.loop_start >= 0).mean()) if data.loop_start is not None and n else None,
            "grid": dataclasses.asdict(grid), "n_configurations": len(rows), "presets": presets,
            "frontier": {d: frontier(rows, d) for d in detectors}, "at_preset_fire_right": at, "rows": rows}


def plot_frontier(reports: Sequence[dict[str, Any]], path: str | Path,
                  zoom: tuple[float, float, float, float] | None = (0.0, 0.3, 0.3, 0.75)) -> Path:
    """Fire on wrong vs fire on right rollouts, per report one panel (and, with `zoom` = (x0, x1, y0,
    y1), a second panel on that region, where the low-false-alarm configurations crowd): every
    configuration of each detector (faint), its Pareto frontier (step line), KAT's world and paper
    presets (markers)."""
    from kat_diag.analysis import style
    from kat_diag.views.palette import DETECTOR_COLORS as colors
    per = 2 if zoom else 1
    fig, axes = style.figure(1, per * len(reports), size=(5.2 * per * len(reports) + 2.2, 4.8), squeeze=False)
    for i, rep in enumerate(reports):
        for j in range(per):
            ax = axes[0][per * i + j]
            for d, fr in rep["frontier"].items():
                pts = [(r["fire_right"], r["fire_wrong"]) for r in rep.get("rows", []) if r["detector"] == d]
                if pts:
                    x, y = np.array(pts, dtype=float).T
                    ax.scatter(x, y, s=5, alpha=0.15, color=colors.get(d), linewidths=0)
                if fr:
                    xs = [r["fire_right"] for r in fr] + [1.0]  # best attainable at each fire rate on right
                    ys = [r["fire_wrong"] for r in fr] + [fr[-1]["fire_wrong"]]
                    ax.step(xs, ys, where="post", color=colors.get(d), lw=1.8, label=DETECTOR_LABELS.get(d, d))
            for name, marker in (("world", "*"), ("paper", "D")):
                p = rep["presets"].get(name)
                if p is not None:
                    ax.scatter([p["fire_right"]], [p["fire_wrong"]], marker=marker, s=160 if marker == "*" else 60,
                               color=style.INK, zorder=5, label=f"KAT {name} preset")
            ax.plot([0, 1], [0, 1], color=style.MARK_COLORS["reference"], lw=0.8, ls=":")
            x0, x1, y0, y1 = zoom if j == 1 and zoom else (0.0, 1.0, 0.0, 1.0)
            pad = 0.02 * (x1 - x0)
            ax.set_xlim(x0 - pad, x1 + pad)
            ax.set_ylim(y0 - pad, y1 + pad)
            ax.set_xlabel("fires on right rollouts (share)")
            ax.set_ylabel("fires on wrong rollouts (share)")
            title = f"{rep['label']}: {rep['rollouts']} rollouts, accuracy {rep['accuracy']:.2f}"
            ax.set_title(title if j == 0 else "zoom: few fires on right rollouts")
            if j == per - 1:
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return style.save(fig, path)


def frontier_table(rep: dict[str, Any], max_rows: int = 8) -> list[dict[str, Any]]:
    """Rows for a printed table: the presets, then per detector its frontier thinned to `max_rows`
    and its best row at the world preset's fire rate on right rollouts."""
    out = [{"what": f"KAT {k} preset", **v} for k, v in rep["presets"].items()]
    for d, fr in rep["frontier"].items():
        at = rep["at_preset_fire_right"]["world"].get(d)
        if at is not None:
            out.append({"what": f"{DETECTOR_LABELS.get(d, d)}: best at world preset's fire on right", **at})
        idx = np.unique(np.linspace(0, len(fr) - 1, min(max_rows, len(fr))).round().astype(int)) if fr else []
        out += [{"what": f"{DETECTOR_LABELS.get(d, d)}: frontier", **fr[i]} for i in idx]
    return out
