"""Per-phase statistics of a trace store, and the paper's heatmap findings as numbers.

docs/kat.md#phases splits every rollout into pre-agreement, agreement and post-agreement
(`kat_diag.kat.phases.segment`, the detector replayed with hindsight). The paper shows heatmaps and
reads three findings off them; this module measures them instead:

1. the share of rollouts with an *extended low-KL segment*: a run of at least T consecutive low
   windows (window mean < tau, the detector's own low flags), early vs late in training;
2. the median token position where the first such segment starts, early vs late;
3. the mean KL after the first segment vs before it (does the student recover from agreement?).

Next to them, a per-phase table (token share, mean KL, student entropy, teacher entropy) and the
accuracy of rollouts with and without a trap (the detector fired with hindsight), per stage. Every
mean carries a 95 % bootstrap interval resampling rollouts (the unit of dependence; per-rollout
sums are kept per stage, a few floats per rollout), every share a Wilson interval. In a run whose
policy cut its rollouts at fire (KAT), the trap rollouts have no final answer: their "accuracy" is
an artefact of the cut, so the report flags it (`cut_trap`) and the plot says so instead of
drawing it.

Teacher entropy is not stored; it is approximated from the stored teacher top-n probabilities plus
one tail bucket holding the remaining mass, ``-sum_i p_i ln p_i - r ln r``. Spreading the tail over
more tokens can only raise the entropy, so this is a lower bound of the true teacher entropy (tight
when the top-n hold almost all the mass, as they do on a peaked teacher).

Everything here is a pure function over arrays (`low_runs`, `first_extended`,
`teacher_entropy_topn`, `batch_phase_stats`) plus one store-level driver (`phase_report`) that
streams the store batch by batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kat_diag.analysis import store as S
from kat_diag.analysis.threshold import needs_derived, resolve_tau, store_tau
from kat_diag.kat.config import KATConfig
from kat_diag.kat.phases import phase_labels, segment
from kat_diag.kat.replay import replay
from kat_diag.traces.ragged import Ragged
from kat_diag.traces.reader import TraceReader

PHASES = ("pre", "agreement", "post")
UNIT_KEYS = ("kl", "student_entropy", "teacher_entropy", "seg_kl")  # means with a bootstrap CI
N_BOOT = 500
SEGMENT_PARTS = ("before", "inside", "after")
TEACHER_ENTROPY_NOTE = ("teacher entropy: lower bound from the stored top-n probabilities plus one tail "
                        "bucket (-sum p ln p - r ln r)")


# --------------------------------------------------------------------------------------------------
# Pure functions


@dataclass(frozen=True)
class LowRuns:
    """Maximal runs of consecutive low windows (int64 arrays, one entry per run).

    A run of windows ending at tokens i..j covers the tokens [i - W + 1, j + 1): ``start`` and
    ``end`` are those token positions within the rollout, ``windows`` = j - i + 1.
    """

    rollout: np.ndarray
    start: np.ndarray
    end: np.ndarray
    windows: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return self.end - self.start


def low_runs(low: np.ndarray, offsets: np.ndarray, window: int) -> LowRuns:
    """Runs of consecutive low windows from per-token low flags (`ReplayResult.low`: the window
    ending at the token is usable and below tau). A run never crosses a rollout boundary."""
    low = np.asarray(low, dtype=bool)
    offs = np.asarray(offsets, dtype=np.int64)
    n = low.shape[0]
    first = np.zeros(n, dtype=bool)
    last = np.zeros(n, dtype=bool)
    nonempty = offs[:-1] < offs[1:]
    first[offs[:-1][nonempty]] = True
    last[offs[1:][nonempty] - 1] = True
    prev_low = np.concatenate([[False], low[:-1]]) & ~first
    next_low = np.concatenate([low[1:], [False]]) & ~last
    s = np.flatnonzero(low & ~prev_low)
    e = np.flatnonzero(low & ~next_low)
    rollout = np.searchsorted(offs, s, side="right") - 1
    base = offs[rollout]
    return LowRuns(rollout=rollout.astype(np.int64), start=(s - base - window + 1).astype(np.int64),
                   end=(e - base + 1).astype(np.int64), windows=(e - s + 1).astype(np.int64))


def first_extended(runs: LowRuns, n_rollouts: int, persistence: int) -> tuple[np.ndarray, np.ndarray]:
    """Per rollout, the token span [start, end) of its first run of >= T low windows (-1, -1: none)."""
    start = np.full(n_rollouts, -1, dtype=np.int64)
    end = np.full(n_rollouts, -1, dtype=np.int64)
    ext = np.flatnonzero(runs.windows >= persistence)
    # Runs are in token order, so the first run of each rollout is where its index first appears.
    r, first = np.unique(runs.rollout[ext], return_index=True)
    start[r] = runs.start[ext[first]]
    end[r] = runs.end[ext[first]]
    return start, end


def extended_token_mask(runs: LowRuns, offsets: np.ndarray, persistence: int) -> np.ndarray:
    """Per token: inside some run of >= T low windows (token spans of runs may overlap)."""
    offs = np.asarray(offsets, dtype=np.int64)
    n = int(offs[-1] - offs[0])
    ext = runs.windows >= persistence
    base = offs[:-1][runs.rollout[ext]] - offs[0]
    delta = np.zeros(n + 1, dtype=np.int64)
    np.add.at(delta, base + runs.start[ext], 1)
    np.add.at(delta, base + runs.end[ext], -1)
    return np.cumsum(delta[:-1]) > 0


def teacher_entropy_topn(top_probs: np.ndarray) -> np.ndarray:
    """Lower bound of the teacher entropy (nats) per token from top-n probs ``[tokens, n]`` plus one
    tail bucket; NaN where the probs are missing (stored as NaN)."""
    p = np.asarray(top_probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"top_probs must be [tokens, n], got shape {p.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        tail_term = np.where(tail > 1e-12, tail * np.log(np.where(tail > 1e-12, tail, 1.0)), 0.0)
    h = -plogp.sum(axis=1) - tail_term
    return np.where(np.isfinite(p).all(axis=1), h, np.nan)


@dataclass(frozen=True)
class BatchPhases:
    """Per-rollout phases and first extended low-KL segment of one batch (int64 arrays)."""

    onset: np.ndarray
    fire: np.ndarray
    pre_end: np.ndarray
    agree_end: np.ndarray
    length: np.ndarray
    seg_start: np.ndarray  # -1: no run of >= T low windows
    seg_end: np.ndarray
    run_tokens: np.ndarray  # token length of every maximal low-window run (any length), for histograms
    run_rollout: np.ndarray  # the rollout (index in the batch) of each run
    phase_tok: np.ndarray  # per token: 0 pre, 1 agreement, 2 post
    seg_tok: np.ndarray  # per token: 0 before, 1 inside, 2 after the first extended segment (0 if none)
    in_ext_tok: np.ndarray  # per token: inside any extended segment


def batch_phases(kl_values: np.ndarray, offsets: np.ndarray, cfg: KATConfig, tau_R: np.ndarray) -> BatchPhases:
    """Phases (docs/kat.md#phases) and low-KL runs of a ragged batch at per-rollout tau."""
    offs = np.asarray(offsets, dtype=np.int64)
    ph = segment(kl_values, offs, cfg, tau_R)
    low = replay(kl_values, offs, cfg, tau_R, return_low=True).low
    assert low is not None
    runs = low_runs(low[offs[0]:offs[-1]], offs - offs[0], cfg.window)
    seg_start, seg_end = first_extended(runs, len(offs) - 1, cfg.persistence)
    has = seg_start >= 0
    seg_tok = phase_labels(offs, np.where(has, seg_start, ph.length), np.where(has, seg_end, ph.length))
    return BatchPhases(onset=ph.onset, fire=ph.fire, pre_end=ph.pre_end, agree_end=ph.agree_end,
                       length=ph.length, seg_start=seg_start, seg_end=seg_end, run_tokens=runs.tokens,
                       run_rollout=runs.rollout,
                       phase_tok=phase_labels(offs, ph.pre_end, ph.agree_end), seg_tok=seg_tok,
                       in_ext_tok=extended_token_mask(runs, offs - offs[0], cfg.persistence))


def _sums(labels: np.ndarray, values: np.ndarray | None, n_labels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(sum of finite values, count of finite values) per label."""
    if values is None:
        return np.zeros(n_labels), np.zeros(n_labels, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    return (np.bincount(labels[ok], weights=v[ok], minlength=n_labels)[:n_labels],
            np.bincount(labels[ok], minlength=n_labels)[:n_labels].astype(np.int64))


# --------------------------------------------------------------------------------------------------
# Accumulation per stage


@dataclass
class _StageAcc:
    """Running sums of one stage (plain mutable accumulator; the result is a frozen StageStats)."""

    steps: tuple[int, int]
    rollouts: int = 0
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    graded: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))  # [no trap, trap]
    correct: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))
    trapped: int = 0
    cut_trap: int = 0  # trap rollouts the run's policy stopped (no final answer)
    seg_rollouts: int = 0
    seg_starts: list[np.ndarray] = field(default_factory=list)
    units: list[np.ndarray] = field(default_factory=list)  # per rollout: UNIT_KEYS x (sum[3], count[3])

    def add(self, key: str, labels: np.ndarray, values: np.ndarray | None) -> None:
        s, c = _sums(labels, values)
        self.sums[key] = self.sums.get(key, np.zeros(3)) + s
        self.counts[key] = self.counts.get(key, np.zeros(3, dtype=np.int64)) + c


@dataclass(frozen=True)
class StageStats:
    """Phase table and findings of one stage (a step range)."""

    stage: str
    steps: tuple[int, int]
    rollouts: int
    phase_tokens: tuple[int, int, int]
    phase_kl: tuple[float, float, float]  # mean reverse KL per phase (nats, finite tokens)
    phase_student_entropy: tuple[float, float, float]
    phase_teacher_entropy: tuple[float, float, float]  # lower bound, see module docstring
    trap_rollouts: int  # detector fires with hindsight (agreement phase non-empty)
    accuracy_trap: float  # NaN when no graded rollout in the group
    accuracy_no_trap: float
    graded_trap: int
    graded_no_trap: int
    segment_share: float  # finding 1
    segment_median_start: float  # finding 2 (token position; NaN if none)
    segment_kl: tuple[float, float, float]  # finding 3: mean KL before / inside / after the first segment
    cut_trap: int = 0  # trap rollouts the run's policy stopped at fire: their accuracy is the cut's artefact
    ci: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)  # UNIT_KEYS -> 3 x (lo, hi)

    @property
    def accuracy_ci(self) -> dict[str, tuple[float, float]]:
        """95 % Wilson intervals of the two accuracies."""
        from kat_diag.analysis.stats import wilson

        out = {}
        for name, acc, n in (("trap", self.accuracy_trap, self.graded_trap),
                             ("no_trap", self.accuracy_no_trap, self.graded_no_trap)):
            lo, hi = wilson(acc * n if n else 0.0, n)
            out[name] = (float(lo), float(hi))
        return out

    @property
    def segment_share_ci(self) -> tuple[float, float]:
        from kat_diag.analysis.stats import wilson

        lo, hi = wilson(self.segment_share * self.rollouts if self.rollouts else 0.0, self.rollouts)
        return float(lo), float(hi)

    @property
    def policy_artefact(self) -> bool:
        """Most trap rollouts were cut by the run's policy: their accuracy measures the cut, not the trap."""
        return self.trap_rollouts > 0 and self.cut_trap >= 0.5 * self.trap_rollouts

    @property
    def phase_share(self) -> tuple[float, float, float]:
        total = sum(self.phase_tokens)
        return tuple(t / total if total else math.nan for t in self.phase_tokens)  # type: ignore[return-value]

    @property
    def kl_after_over_before(self) -> float:
        before, _, after = self.segment_kl
        return after / before if before and math.isfinite(before) and math.isfinite(after) else math.nan

    def as_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        def ci(key: str, i: int) -> list[float | None]:
            pair = self.ci.get(key)
            return [None, None] if pair is None else [num(pair[i][0]), num(pair[i][1])]

        acc_ci = self.accuracy_ci
        return {
            "stage": self.stage, "steps": list(self.steps), "rollouts": self.rollouts,
            "phases": {name: {"tokens": self.phase_tokens[i], "token_share": num(self.phase_share[i]),
                              "mean_kl": num(self.phase_kl[i]), "mean_kl_ci": ci("kl", i),
                              "student_entropy": num(self.phase_student_entropy[i]),
                              "student_entropy_ci": ci("student_entropy", i),
                              "teacher_entropy_lb": num(self.phase_teacher_entropy[i]),
                              "teacher_entropy_lb_ci": ci("teacher_entropy", i)}
                       for i, name in enumerate(PHASES)},
            "trap_share": num(self.trap_rollouts / self.rollouts if self.rollouts else math.nan),
            "accuracy": {"trap": num(self.accuracy_trap), "no_trap": num(self.accuracy_no_trap),
                         "trap_ci": [num(v) for v in acc_ci["trap"]], "no_trap_ci": [num(v) for v in acc_ci["no_trap"]],
                         "graded_trap": self.graded_trap, "graded_no_trap": self.graded_no_trap,
                         "trap_cut_by_policy": self.cut_trap,
                         "note": ("trap rollouts were cut at fire by the run's policy: no final answer, so their "
                                  "accuracy is an artefact of the cut") if self.policy_artefact else None},
            "findings": {"extended_low_kl_share": num(self.segment_share),
                         "extended_low_kl_share_ci": [num(v) for v in self.segment_share_ci],
                         "first_segment_median_start": num(self.segment_median_start),
                         "kl_before_segment": num(self.segment_kl[0]),
                         "kl_inside_segment": num(self.segment_kl[1]),
                         "kl_after_segment": num(self.segment_kl[2]),
                         "kl_segment_ci": [ci("seg_kl", i) for i in range(3)],
                         "kl_after_over_before": num(self.kl_after_over_before)},
        }


def unit_rows(roll_tok: np.ndarray, labels: np.ndarray, values: np.ndarray | None, n_rollouts: int) -> np.ndarray:
    """[n_rollouts, 6]: per rollout the sum (3 labels) and count (3 labels) of its finite values."""
    out = np.zeros((n_rollouts, 6))
    if values is None:
        return out
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    flat = roll_tok[ok] * 3 + labels[ok]
    out[:, :3] = np.bincount(flat, weights=v[ok], minlength=n_rollouts * 3).reshape(n_rollouts, 3)
    out[:, 3:] = np.bincount(flat, minlength=n_rollouts * 3).reshape(n_rollouts, 3)
    return out


def unit_cis(units: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, tuple[tuple[float, float], ...]]:
    """95 % bootstrap intervals (resampling rollouts) of every UNIT_KEYS mean per label."""
    from kat_diag.analysis.stats import cluster_bootstrap, percentile_interval

    out: dict[str, tuple[tuple[float, float], ...]] = {}
    for j, key in enumerate(UNIT_KEYS):
        block = units[:, 6 * j:6 * j + 6]
        pairs = []
        for i in range(3):
            has = block[:, 3 + i] > 0
            if has.sum() < 2:
                pairs.append((math.nan, math.nan))
                continue
            reps = cluster_bootstrap(block[has, i], block[has, 3 + i], n_boot, seed + 7 * j + i)
            lo, hi = percentile_interval(reps)
            pairs.append((float(lo), float(hi)))
        out[key] = tuple(pairs)
    return out


def _finish(name: str, acc: _StageAcc, seed: int = 0) -> StageStats:
    def mean(key: str) -> tuple[float, float, float]:
        s, c = acc.sums.get(key, np.zeros(3)), acc.counts.get(key, np.zeros(3, dtype=np.int64))
        return tuple(float(s[i] / c[i]) if c[i] else math.nan for i in range(3))  # type: ignore[return-value]

    starts = np.concatenate(acc.seg_starts) if acc.seg_starts else np.zeros(0)
    acc_rate = [acc.correct[i] / acc.graded[i] if acc.graded[i] else math.nan for i in range(2)]
    ci = unit_cis(np.concatenate(acc.units) if acc.units else np.zeros((0, 6 * len(UNIT_KEYS))), seed=seed)
    return StageStats(
        stage=name, steps=acc.steps, rollouts=acc.rollouts,
        phase_tokens=tuple(int(t) for t in acc.tokens),  # type: ignore[arg-type]
        phase_kl=mean("kl"), phase_student_entropy=mean("student_entropy"),
        phase_teacher_entropy=mean("teacher_entropy"), trap_rollouts=acc.trapped,
        accuracy_trap=float(acc_rate[1]), accuracy_no_trap=float(acc_rate[0]),
        graded_trap=int(acc.graded[1]), graded_no_trap=int(acc.graded[0]),
        segment_share=acc.seg_rollouts / acc.rollouts if acc.rollouts else math.nan,
        segment_median_start=float(np.median(starts)) if starts.size else math.nan,
        segment_kl=mean("seg_kl"), cut_trap=acc.cut_trap, ci=ci,
    )


@dataclass(frozen=True)
class PhaseReport:
    """Result of `phase_report`: one StageStats per stage ("all" first), the tau used, the KAT config."""

    stages: tuple[StageStats, ...]
    tau: dict[str, Any]
    cfg: KATConfig
    run_lengths: dict[str, np.ndarray]  # stage -> token lengths of all maximal low-window runs

    def stage(self, name: str) -> StageStats:
        return next(s for s in self.stages if s.stage == name)

    def as_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "kat": {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
                "teacher_entropy": TEACHER_ENTROPY_NOTE, "stages": [s.as_dict() for s in self.stages]}

    def table(self) -> list[dict[str, Any]]:
        """Long table: one row per (stage, phase)."""
        rows = []
        for s in self.stages:
            for i, name in enumerate(PHASES):
                rows.append({"stage": s.stage, "step_lo": s.steps[0], "step_hi": s.steps[1], "phase": name,
                             "tokens": s.phase_tokens[i], "token_share": s.phase_share[i],
                             "mean_kl": s.phase_kl[i], "student_entropy": s.phase_student_entropy[i],
                             "teacher_entropy_lb": s.phase_teacher_entropy[i]})
        return rows


PHASE_COLUMNS = ["rollout_id", "step", "tau", "correct", "kl", "student_entropy", "teacher_top_probs", "stop_reason"]


def phase_report(reader: TraceReader, cfg: KATConfig, tau: str | float = "auto", *,
                 early: tuple[int, int] | None = None, late: tuple[int, int] | None = None,
                 tau_sample: int = 4096, seed: int = 0, rows: list[dict[str, np.ndarray]] | None = None,
                 **filters: Any) -> PhaseReport:
    """Stream the store (after one scalar pass) and build the per-phase report.

    tau: see `kat_diag.analysis.threshold` (the derived tau uses a seeded sample of up to
    ``tau_sample`` rollouts). ``rows``: when a list is given, per-rollout segmentation arrays of
    every batch are appended to it (rollout_id, step, length, tau, onset, fire, pre_end, agree_end,
    seg_start, seg_end, correct).
    """
    scal = S.scan_scalars(reader, ["rollout_id", "step", "tau"], **filters)
    if scal["rollout_id"].size == 0:
        raise ValueError(f"no rollouts in {reader.dir} match the filters")
    ranges = {"all": (int(scal["step"].min()), int(scal["step"].max()))}
    ranges.update({k: v for k, v in S.stage_ranges(scal["step"], early, late).items() if k != "all"})
    derived = math.nan
    if needs_derived(scal["tau"], tau):
        derived = store_tau(reader, cfg, scal["rollout_id"], sample=tau_sample, seed=seed)
    accs = {name: _StageAcc(rng) for name, rng in ranges.items()}
    run_lengths: dict[str, list[np.ndarray]] = {name: [] for name in ranges}
    used: list[np.ndarray] = []
    for b in reader.iter_batches(PHASE_COLUMNS, **filters):
        kl: Ragged = b["kl"]
        tau_R = resolve_tau(b["tau"], tau, derived)
        used.append(tau_R)
        bp = batch_phases(kl.values, kl.offsets, cfg, tau_R)
        trap = bp.fire >= 0
        teacher_h = (teacher_entropy_topn(b["teacher_top_probs"].values)
                     if b["teacher_top_probs"].values.size else None)
        roll_tok = np.repeat(np.arange(b.num_rows), kl.lengths)
        for name, rng in ranges.items():
            sel = S.in_range(b["step"], rng)
            if not sel.any():
                continue
            tok = sel[roll_tok]
            acc = accs[name]
            acc.rollouts += int(sel.sum())
            acc.tokens += np.bincount(bp.phase_tok[tok], minlength=3)[:3]
            acc.add("kl", bp.phase_tok[tok], kl.values[tok])
            acc.add("student_entropy", bp.phase_tok[tok], b["student_entropy"].values[tok])
            acc.add("teacher_entropy", bp.phase_tok[tok], None if teacher_h is None else teacher_h[tok])
            has_seg = sel & (bp.seg_start >= 0)
            acc.add("seg_kl", bp.seg_tok[has_seg[roll_tok]], kl.values[has_seg[roll_tok]])
            idx = np.flatnonzero(sel)
            local = np.full(b.num_rows, -1)
            local[idx] = np.arange(idx.size)
            seg_vals = np.where(has_seg[roll_tok], kl.values, np.nan)
            acc.units.append(np.concatenate([
                unit_rows(local[roll_tok[tok]], bp.phase_tok[tok], kl.values[tok], idx.size),
                unit_rows(local[roll_tok[tok]], bp.phase_tok[tok], b["student_entropy"].values[tok], idx.size),
                unit_rows(local[roll_tok[tok]], bp.phase_tok[tok], None if teacher_h is None else teacher_h[tok],
                          idx.size),
                unit_rows(local[roll_tok[tok]], bp.seg_tok[tok], seg_vals[tok], idx.size)], axis=1))
            acc.cut_trap += int((sel & trap & (b["stop_reason"] == "policy")).sum())
            acc.seg_rollouts += int(has_seg.sum())
            acc.seg_starts.append(bp.seg_start[has_seg])
            acc.trapped += int((sel & trap).sum())
            graded = sel & (b["correct"] >= 0)
            for t in (0, 1):
                g = graded & (trap == bool(t))
                acc.graded[t] += int(g.sum())
                acc.correct[t] += int((b["correct"][g] == 1).sum())
            run_lengths[name].append(bp.run_tokens[sel[bp.run_rollout]])
        if rows is not None:
            rows.append({"rollout_id": b["rollout_id"], "step": b["step"], "length": bp.length, "tau": tau_R,
                         "onset": bp.onset, "fire": bp.fire, "pre_end": bp.pre_end, "agree_end": bp.agree_end,
                         "seg_start": bp.seg_start, "seg_end": bp.seg_end, "correct": b["correct"]})
    taus = np.concatenate(used)
    recorded = np.isfinite(scal["tau"])
    tau_info = {"mode": tau if isinstance(tau, str) else "fixed", "derived": None if math.isnan(derived) else derived,
                "recorded_share": float(recorded.mean()), "median": float(np.nanmedian(taus)) if
                np.isfinite(taus).any() else None}
    stages = tuple(_finish(name, accs[name], seed) for name in ranges)
    return PhaseReport(stages=stages, tau=tau_info, cfg=cfg,
                       run_lengths={k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64)
                                    for k, v in run_lengths.items()})


# --------------------------------------------------------------------------------------------------
# Plot


def _dots(ax: Any, ys: np.ndarray, vals: np.ndarray, cis: list[tuple[float, float]], colors: list[str],
          markers: list[str] | None = None, filled: list[bool] | None = None, label: list[str] | None = None) -> None:
    """Horizontal dot plot: a dot per value with its CI as a line (NaN values are skipped)."""
    from kat_diag.analysis import style

    for i, (y, v, (lo, hi), c) in enumerate(zip(ys, vals, cis, colors, strict=True)):
        if not np.isfinite(v):
            continue
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [y, y], color=c, linewidth=1.4, solid_capstyle="butt")
        face = c if filled is None or filled[i] else style.PAPER
        ax.plot([v], [y], marker=(markers or ["o"] * len(vals))[i], color=c, markerfacecolor=face, markersize=4.5,
                linestyle="none", label=None if label is None else label[i])


def plot(report: PhaseReport, fig: Any = None) -> Any:
    """Six panels, every mean with a 95 % bootstrap CI (rollouts) and every share with a Wilson CI:
    token share per phase; mean KL per phase; student and teacher entropy per phase; accuracy with
    vs without a trap (or why it does not apply); share of rollouts with an extended low-KL segment;
    KL before / inside / after the first segment."""
    from matplotlib.lines import Line2D

    from kat_diag.analysis import style

    if fig is None:
        fig, axes = style.figure(2, 3, size=(style.TEXT_WIDTH, 5.0))
    else:
        axes = np.array(fig.subplots(2, 3))
    (a_share, a_kl, a_ent), (a_acc, a_find, a_seg) = axes
    stages = report.stages
    names = [f"{s.stage} ({s.steps[0]}-{s.steps[1]})" for s in stages]
    x = np.arange(len(stages))
    # (a) token share: linear stacked bars, one per stage
    left = np.zeros(len(stages))
    for i, ph in enumerate(PHASES):
        share = np.nan_to_num(np.array([s.phase_share[i] for s in stages], dtype=float))
        a_share.barh(x, share, left=left, color=style.PHASE_COLORS[ph], label=ph, height=0.6)
        for xi, lf, v in zip(x, left, share, strict=True):
            if v > 0.08:
                a_share.text(lf + v / 2, xi, f"{v:.0%}", ha="center", va="center", fontsize=6.5, color=style.PAPER)
        left += share
    a_share.set_yticks(x, names)
    a_share.invert_yaxis()
    a_share.set_xlim(0, 1)
    a_share.set_xlabel("share of tokens")
    a_share.set_title("tokens per phase")
    a_share.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=6.5)
    a_share.grid(False)

    # (b) mean KL per phase: dots with CIs, log x. A sampled estimate (k1, imported) can be <= 0, and
    # so can its tau: then the KL axes are symlog (linear near 0) and no value is dropped.
    tau_med = report.tau.get("median")
    kl_seen = [v for s in stages for v in (*s.phase_kl, *s.segment_kl) if np.isfinite(v)]
    signed = min(kl_seen, default=1.0) <= 0 or (tau_med is not None and np.isfinite(tau_med) and tau_med <= 0)

    def shown(v: np.ndarray) -> np.ndarray:
        return v if signed else np.where(v > 0, v, np.nan)

    def kl_axis(ax: Any, what: str) -> None:
        if signed:
            ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_xlabel(f"{what} (nats, symlog)")
        else:
            ax.set_xscale("log")
            ax.set_xlabel(f"{what} (nats, log)")

    offs = np.array([-0.22, 0.0, 0.22])
    for i, ph in enumerate(PHASES):
        v = np.array([s.phase_kl[i] for s in stages], dtype=float)
        cis = [s.ci.get("kl", ((math.nan, math.nan),) * 3)[i] for s in stages]
        _dots(a_kl, x + offs[i], shown(v), cis, [style.PHASE_COLORS[ph]] * len(stages))
    for ax in (a_kl, a_seg):  # tau on every KL scale
        if tau_med:
            ax.axvline(tau_med, color=style.MARK_COLORS["tau"], linestyle="--", linewidth=0.8)
            ax.text(tau_med, 1.0, " tau", transform=ax.get_xaxis_transform(), fontsize=6, va="bottom")
    kl_axis(a_kl, "mean reverse KL")
    a_kl.set_yticks(x, [s.stage for s in stages])
    a_kl.invert_yaxis()
    a_kl.set_title("KL per phase")

    # (c) entropy per phase: student filled, teacher (lower bound) hollow
    has_entropy = any(np.isfinite(v) for s in stages
                      for v in (*s.phase_student_entropy, *s.phase_teacher_entropy))
    for j, s in enumerate(stages if has_entropy else []):
        for i, ph in enumerate(PHASES):
            y = j + offs[i]
            for key, val, filled in (("student_entropy", s.phase_student_entropy[i], True),
                                     ("teacher_entropy", s.phase_teacher_entropy[i], False)):
                ci = s.ci.get(key, ((math.nan, math.nan),) * 3)[i]
                _dots(a_ent, np.array([y + (0.0 if filled else 0.06)]), np.array([val], dtype=float), [ci],
                      [style.PHASE_COLORS[ph]], markers=["o" if filled else "D"], filled=[filled])
    a_ent.set_title("entropy per phase")
    if not has_entropy:  # e.g. a store imported from log-probs of the sampled tokens only
        style.no_panel(a_ent, "no entropies in this store:\nit has no student_entropy column\nand no teacher top-n")
    else:
        a_ent.set_yticks(x, [s.stage for s in stages])
        a_ent.invert_yaxis()
        a_ent.set_xlabel("mean entropy (nats)")
        a_ent.legend(handles=[Line2D([], [], marker="o", color=style.INK, linestyle="none", label="student"),
                              Line2D([], [], marker="D", color=style.INK, markerfacecolor=style.PAPER,
                                     linestyle="none", label="teacher (lower bound)")], fontsize=6,
                     loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)

    # (d) accuracy with vs without a trap
    if all(s.policy_artefact or (s.graded_trap + s.graded_no_trap) == 0 for s in stages):
        cut = sum(s.cut_trap for s in stages if s.stage == "all") or sum(s.cut_trap for s in stages)
        style.no_panel(a_acc, "accuracy with vs without a trap:\ndoes not apply here -\nthe run's policy cut "
                       f"{cut} trap rollouts at fire,\nso they have no final answer.\nCompare on a run without "
                       "termination.")
    else:
        for k, (key, label, color, mk) in enumerate((("no_trap", "no trap", style.PHASE_COLORS["pre"], "o"),
                                                     ("trap", "trap (fired with hindsight)",
                                                      style.PHASE_COLORS["agreement"], "s"))):
            ys = x + (k - 0.5) * 0.3
            for y, s in zip(ys, stages, strict=True):
                if s.policy_artefact:
                    if k == 0:
                        a_acc.text(0.5, y + 0.15, f"n/a: the policy cut\n{s.cut_trap} trap rollouts at fire",
                                   ha="center", va="center", fontsize=6, color=style.MUTED)
                    continue
                v = s.accuracy_no_trap if key == "no_trap" else s.accuracy_trap
                n = s.graded_no_trap if key == "no_trap" else s.graded_trap
                _dots(a_acc, np.array([y]), np.array([v]), [s.accuracy_ci[key]], [color], markers=[mk])
                if np.isfinite(v):
                    a_acc.text(1.02, y, f"n={n}", va="center", fontsize=6, transform=a_acc.get_yaxis_transform())
            a_acc.plot([], [], marker=mk, color=color, linestyle="none", label=label)
        a_acc.set_yticks(x, [s.stage for s in stages])
        a_acc.set_ylim(len(stages) - 0.5, -0.5)
        a_acc.set_xlim(0, 1)
        a_acc.set_xlabel("accuracy (share correct)")
        a_acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=6)
    a_acc.set_title("accuracy: trap vs no trap")

    # (e) extended low-KL segment share with Wilson CI
    share = np.array([s.segment_share for s in stages], dtype=float)
    _dots(a_find, x, share, [s.segment_share_ci for s in stages], [style.PHASE_COLORS["agreement"]] * len(stages))
    for xi, s in zip(x, stages, strict=True):
        med = s.segment_median_start
        a_find.text(1.02, xi, f"n={s.rollouts}" + (f"\nstart {med:.0f}" if np.isfinite(med) else ""), va="center",
                    fontsize=6, transform=a_find.get_yaxis_transform())
    a_find.set_yticks(x, [s.stage for s in stages])
    a_find.invert_yaxis()
    a_find.set_xlim(0, 1)
    a_find.set_xlabel("share of rollouts (median start)")
    a_find.set_title(f">= {report.cfg.persistence} low windows in a row")

    # (f) KL around the first segment
    part_colors = [style.PHASE_COLORS["pre"], style.PHASE_COLORS["agreement"], style.PHASE_COLORS["post"]]
    for k, part in enumerate(SEGMENT_PARTS):
        v = np.array([s.segment_kl[k] for s in stages], dtype=float)
        cis = [s.ci.get("seg_kl", ((math.nan, math.nan),) * 3)[k] for s in stages]
        _dots(a_seg, x + offs[k], shown(v), cis, [part_colors[k]] * len(stages))
        a_seg.plot([], [], marker="o", color=part_colors[k], linestyle="none", label=f"{part}")
    kl_axis(a_seg, "mean reverse KL")
    a_seg.set_yticks(x, [s.stage for s in stages])
    a_seg.invert_yaxis()
    a_seg.set_title("KL around the first segment")
    a_seg.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=6)
    tau = report.tau
    fig.suptitle(f"Phases with hindsight: tau {tau['mode']}"
                 + (f", derived {tau['derived']:.3g}" if tau.get("derived") else "")
                 + (f", median {tau['median']:.3g} nats" if tau.get("median") else "")
                 + f"; W={report.cfg.window}, T={report.cfg.persistence}, L0={report.cfg.min_length}\n"
                 "95 % CIs: bootstrap over rollouts for means, Wilson for shares", fontsize=8.5)
    fig.tight_layout()
    return fig


def run_phases(run_dir: str | Path, out_dir: str | Path, *, cfg: KATConfig | None = None, tau: str | float = "auto",
               **options: Any) -> dict[str, Any]:
    """Compute, draw and save: ``phases.png``, ``phases.csv`` (one row per stage and phase),
    ``phases_rollouts.parquet`` (the segmentation of every rollout). Returns the JSON-ready report
    with the written paths. ``options``: those of `phase_report`."""
    from kat_diag.analysis import style
    from kat_diag.analysis.output import clean, write_csv, write_parquet
    from kat_diag.views.rollout import kat_config

    reader = TraceReader(run_dir)
    out = Path(out_dir)
    cfg = cfg or kat_config(reader.config)
    rows: list[dict[str, np.ndarray]] = []
    report = phase_report(reader, cfg, tau, rows=rows, **options)
    fig = plot(report)
    S.mark_estimator(fig, reader)  # a sampled-estimator store (k1 / k3) says so on the figure
    png = style.save(fig, out / "phases.png")
    csv_path = write_csv(out / "phases.csv", report.table())
    pq_path = write_parquet(out / "phases_rollouts.parquet", {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
    return clean({**report.as_dict(), "kl_source": reader.kl_source, "files": [str(png), str(csv_path), str(pq_path)]})
