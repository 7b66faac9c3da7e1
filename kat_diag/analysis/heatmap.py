"""KL dynamics heatmaps: rollouts x token position, early vs late training (docs/diagnostics.md).

The paper's first picture of the agreement trap: each row a rollout, each column a token position,
colour the reverse KL on a log scale (the palette's KL map: low KL, agreement, bright); rollouts
that fall into sustained agreement show a bright band that starts at some position and lasts to the
end. This module draws it for a trace store, with the detector's onset and fire marked (replayed
with hindsight at the tau of `kat_diag.analysis.threshold`), the tokens between onset and fire -
generated, then discarded by KAT - hatched, a verdict stripe (right / wrong answer / loop / no
answer / not graded), rows sorted by verdict then onset by default (the order that shows the trap),
an early and a late stage side by side, and three aggregate panels over a larger seeded sample,
each with its uncertainty:

* the share of rollouts inside an extended low-KL segment (a run of >= T low windows) by position,
  right vs not right, with a 95 % Wilson band (n = rollouts still running there);
* the distribution of the lengths of all low-window runs (tokens) as a survival curve (share of
  runs at least that long), with the extended threshold;
* the mean KL by relative position in the rollout (0 = first token, 1 = last), right vs not
  right, with a 95 % bootstrap band resampling rollouts.

The x axis ends at the 95th percentile of the shown rollouts' lengths (the rest is padding); the
shown rows, with their ids and `inspect --step S --index I` addresses, are in heatmap_rows.csv.

Scale: a store of 100k rollouts x 2k tokens is never loaded. One pass reads scalar columns only;
per stage a seeded sample of rollout ids (``sample``, default 2000) is read with only the ``kl``
column, and the picture shows ``rows`` of them with positions binned into at most ``max_cols``
columns (mean KL per bin). Memory is O(sample x length) whatever the store size
(`benchmarks/heatmap_memory.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kat_diag.analysis import store as S
from kat_diag.analysis.phase_stats import batch_phases
from kat_diag.analysis.threshold import needs_derived, resolve_tau, store_tau
from kat_diag.kat.config import KATConfig
from kat_diag.traces.reader import TraceReader

SORT_KEYS = ("verdict", "length", "onset", "correct", "none")
GROUPS = ("right", "not right")
VERDICT_RANK = {"wrong": 0, "loop": 1, "unfinished": 2, "right": 3, "ungraded": 4}
X_QUANTILE = 0.95  # the x axis ends at this quantile of the shown rollouts' lengths


# --------------------------------------------------------------------------------------------------
# Pure functions


def column_width(max_len: int, max_cols: int) -> int:
    """Tokens per heatmap column so that ``max_len`` positions fit in at most ``max_cols`` columns."""
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")
    return max(1, math.ceil(max(max_len, 1) / max_cols))


def _positions(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rollout index, position within the rollout) of every token."""
    offs = np.asarray(offsets, dtype=np.int64)
    length = np.diff(offs)
    rollout = np.repeat(np.arange(length.shape[0]), length)
    pos = np.arange(offs[-1] - offs[0], dtype=np.int64) - (offs[:-1] - offs[0])[rollout]
    return rollout, pos


def binned_mean(values: np.ndarray, offsets: np.ndarray, width: int, n_cols: int) -> np.ndarray:
    """``[rollouts, n_cols]`` mean of the finite values in each block of ``width`` positions
    (NaN where a rollout has no finite value in the block, e.g. past its end)."""
    rollout, pos = _positions(offsets)
    v = np.asarray(values, dtype=np.float64)[: rollout.shape[0]]
    col = pos // width
    ok = np.isfinite(v) & (col < n_cols)
    flat = rollout[ok] * n_cols + col[ok]
    size = (len(offsets) - 1) * n_cols
    s = np.bincount(flat, weights=v[ok], minlength=size)
    c = np.bincount(flat, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    return out.reshape(-1, n_cols)


def position_share(mask: np.ndarray, offsets: np.ndarray, rollouts: np.ndarray, width: int,
                   n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the share of the selected rollouts' tokens there that are in ``mask`` (with width
    1: the share of rollouts still running at that position that are inside the mask), and the
    number of those tokens."""
    rollout, pos = _positions(offsets)
    sel = np.asarray(rollouts, dtype=bool)[rollout]
    col = pos[sel] // width
    keep = col < n_cols
    n = np.bincount(col[keep], minlength=n_cols)[:n_cols]
    k = np.bincount(col[keep], weights=np.asarray(mask, dtype=np.float64)[sel][keep], minlength=n_cols)[:n_cols]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, k / np.maximum(n, 1), np.nan), n


def relative_profile(values: np.ndarray, offsets: np.ndarray, rollouts: np.ndarray, n_bins: int) -> np.ndarray:
    """Mean finite value by relative position ``(pos + 0.5) / length`` in ``n_bins`` equal bins,
    over the selected rollouts (token-weighted)."""
    rollout, pos = _positions(offsets)
    length = np.diff(np.asarray(offsets, dtype=np.int64))
    v = np.asarray(values, dtype=np.float64)[: rollout.shape[0]]
    ok = np.asarray(rollouts, dtype=bool)[rollout] & np.isfinite(v)
    rel = (pos[ok] + 0.5) / length[rollout[ok]]
    b = np.minimum((rel * n_bins).astype(np.int64), n_bins - 1)
    s = np.bincount(b, weights=v[ok], minlength=n_bins)
    c = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def sort_order(key: str, length: np.ndarray, onset: np.ndarray, correct: np.ndarray,
               verdict: np.ndarray | None = None) -> np.ndarray:
    """Row order for the heatmap: by ``verdict`` (wrong, loop, no answer, right, not graded; within
    each, earliest onset first and not fired last, then longest: the order that shows the trap),
    ``length`` (longest first), ``onset`` (earliest first, not fired last, then by length),
    ``correct`` (wrong, ungraded, right; then by length) or ``none``."""
    length = np.asarray(length)
    n = length.shape[0]
    on = np.where(np.asarray(onset) >= 0, onset, np.iinfo(np.int64).max)
    if key == "none":
        return np.arange(n)
    if key == "length":
        return np.lexsort((np.arange(n), -length))
    if key == "onset":
        return np.lexsort((-length, on))
    if key == "correct":
        rank = np.select([np.asarray(correct) == 0, np.asarray(correct) == 1], [0, 2], 1)
        return np.lexsort((-length, rank))
    if key == "verdict":
        v = verdict if verdict is not None else np.where(np.asarray(correct) == 1, "right",
                                                         np.where(np.asarray(correct) == 0, "wrong", "ungraded"))
        rank = np.array([VERDICT_RANK.get(str(x), len(VERDICT_RANK)) for x in v], dtype=np.int64)
        return np.lexsort((-length, on, rank))
    raise ValueError(f"--sort must be one of {SORT_KEYS}, got {key!r}")


def profile_by_rollout(values: np.ndarray, offsets: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per rollout and relative-position bin: the sum and the count of finite values ([R, n_bins] each),
    the units a bootstrap over rollouts resamples (`relative_profile` = their pooled ratio)."""
    rollout, pos = _positions(offsets)
    length = np.diff(np.asarray(offsets, dtype=np.int64))
    v = np.asarray(values, dtype=np.float64)[: rollout.shape[0]]
    ok = np.isfinite(v)
    rel = (pos[ok] + 0.5) / length[rollout[ok]]
    b = np.minimum((rel * n_bins).astype(np.int64), n_bins - 1)
    flat = rollout[ok] * n_bins + b
    size = length.shape[0] * n_bins
    s = np.bincount(flat, weights=v[ok], minlength=size).reshape(-1, n_bins)
    c = np.bincount(flat, minlength=size).reshape(-1, n_bins).astype(np.float64)
    return s, c


def profile_band(sums_RB: np.ndarray, counts_RB: np.ndarray, n_boot: int = 500, seed: int = 0,
                 level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap band (resampling rollouts) of the pooled per-bin mean sum / count."""
    from kat_diag.analysis.stats import cluster_bootstrap, percentile_interval

    if sums_RB.shape[0] < 2:
        nan = np.full(sums_RB.shape[1], np.nan)
        return nan, nan.copy()
    reps = np.stack([cluster_bootstrap(sums_RB[:, j], counts_RB[:, j], n_boot, seed) for j in range(sums_RB.shape[1])],
                    axis=1)
    return percentile_interval(reps, level)


# --------------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class HeatmapStage:
    """One stage's picture (``rows`` sampled rollouts, sorted) and aggregates (over ``sampled``)."""

    name: str
    steps: tuple[int, int]
    rollouts: int  # in the step range
    sampled: int  # rollouts behind the aggregates
    rollout_id: np.ndarray  # shown rows, in display order
    step: np.ndarray
    length: np.ndarray
    onset: np.ndarray
    fire: np.ndarray
    correct: np.ndarray
    verdict: np.ndarray  # right | wrong | loop | unfinished | ungraded
    kl_RC: np.ndarray  # binned mean KL of the shown rows
    share_low: dict[str, np.ndarray]  # group -> share in an extended low-KL segment per column
    share_n: dict[str, np.ndarray]  # group -> tokens behind each share
    run_tokens: np.ndarray  # lengths of all maximal low-window runs of the sample
    rel_kl: dict[str, np.ndarray]  # group -> mean KL per relative-position bin
    rel_band: dict[str, tuple[np.ndarray, np.ndarray]]  # group -> 95 % bootstrap band (rollouts)
    rel_n: dict[str, int]  # group -> rollouts behind the profile
    findings: dict[str, float]


@dataclass(frozen=True)
class HeatmapResult:
    stages: tuple[HeatmapStage, ...]
    width: int  # tokens per column
    n_cols: int
    sort: str
    tau: dict[str, Any]
    cfg: KATConfig
    estimator: str = "reverse KL (full vocabulary)"

    def as_dict(self) -> dict[str, Any]:
        def num(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "tau": self.tau, "tokens_per_column": self.width, "columns": self.n_cols, "sort": self.sort,
            "kl": self.estimator,
            "kat": {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
            "stages": [{"stage": s.name, "steps": list(s.steps), "rollouts": s.rollouts, "sampled": s.sampled,
                        "shown": int(s.rollout_id.shape[0]),
                        "shown_verdicts": {v: int((s.verdict == v).sum()) for v in VERDICT_RANK
                                           if (s.verdict == v).any()},
                        **{k: num(v) for k, v in s.findings.items()}} for s in self.stages],
        }

    def long_table(self) -> list[dict[str, Any]]:
        """The aggregate curves as rows (stage, panel, group, x, value, lo, hi, n) for the CSV."""
        from kat_diag.analysis.stats import wilson

        out: list[dict[str, Any]] = []
        for s in self.stages:
            for g in s.share_low:
                n_roll = s.share_n[g] / self.width
                lo, hi = wilson(s.share_low[g] * n_roll, n_roll)
                for c in range(self.n_cols):
                    out.append({"stage": s.name, "panel": "share_in_low_run", "group": g, "x": (c + 0.5) * self.width,
                                "value": s.share_low[g][c], "lo": lo[c], "hi": hi[c], "n": int(s.share_n[g][c])})
            for g, prof in s.rel_kl.items():
                lo, hi = s.rel_band[g]
                for i, v in enumerate(prof):
                    out.append({"stage": s.name, "panel": "mean_kl_by_relative_position", "group": g,
                                "x": (i + 0.5) / len(prof), "value": v, "lo": lo[i], "hi": hi[i], "n": s.rel_n[g]})
            lengths, counts = np.unique(s.run_tokens, return_counts=True)
            for length, n in zip(lengths.tolist(), counts.tolist(), strict=True):
                out.append({"stage": s.name, "panel": "low_run_length", "group": "all", "x": length,
                            "value": n, "lo": None, "hi": None, "n": n})
        return out


def _stage(name: str, steps: tuple[int, int], n_in_range: int, batch: Any, tau_R: np.ndarray, cfg: KATConfig,
           rows: int, width: int, n_cols: int, sort: str, rel_bins: int, seed: int) -> HeatmapStage:
    from kat_diag.views.track import verdicts

    kl = batch["kl"]
    bp = batch_phases(kl.values, kl.offsets, cfg, tau_R)
    correct = batch["correct"]
    verdict = verdicts(batch["verdict"], correct, batch["stop_reason"])
    groups = {"right": correct == 1, "not right": correct == 0}
    share, share_n, rel, band, rel_n = {}, {}, {}, {}, {}

    def profiles(g: str, sel: np.ndarray) -> None:
        share[g], share_n[g] = position_share(bp.in_ext_tok, kl.offsets, sel, width, n_cols)
        sums, counts = profile_by_rollout(kl.values, kl.offsets, rel_bins)
        rel[g] = relative_profile(kl.values, kl.offsets, sel, rel_bins)
        band[g] = profile_band(sums[sel], counts[sel], seed=seed)
        rel_n[g] = int(sel.sum())

    for g, sel in groups.items():
        if sel.any():
            profiles(g, sel)
    if not groups["right"].any() and not groups["not right"].any():  # ungraded store
        profiles("all", np.ones(batch.num_rows, dtype=bool))
    shown = S.sample_rows(batch.num_rows, rows, seed)
    order = shown[sort_order(sort, bp.length[shown], bp.onset[shown], correct[shown], verdict[shown])]
    has = bp.seg_start >= 0
    seg = np.asarray(bp.seg_tok)
    tok_has = np.repeat(has, kl.lengths)
    vals = np.asarray(kl.values, dtype=np.float64)
    fin = np.isfinite(vals) & tok_has

    def seg_mean(part: int) -> float:
        m = fin & (seg == part)
        return float(vals[m].mean()) if m.any() else math.nan

    before, after = seg_mean(0), seg_mean(2)
    findings = {
        "tau_median": float(np.nanmedian(tau_R)) if np.isfinite(tau_R).any() else math.nan,
        "fired_share": float((bp.fire >= 0).mean()) if bp.fire.size else math.nan,
        "extended_low_kl_share": float(has.mean()) if has.size else math.nan,
        "first_segment_median_start": float(np.median(bp.seg_start[has])) if has.any() else math.nan,
        "kl_before_segment": before, "kl_inside_segment": seg_mean(1), "kl_after_segment": after,
        "kl_after_over_before": after / before if before > 0 and math.isfinite(after) else math.nan,
    }
    take = order
    return HeatmapStage(
        name=name, steps=steps, rollouts=n_in_range, sampled=batch.num_rows, rollout_id=batch["rollout_id"][take],
        step=batch["step"][take], length=bp.length[take], onset=bp.onset[take], fire=bp.fire[take],
        correct=correct[take], verdict=verdict[take],
        kl_RC=binned_mean(kl.values, kl.offsets, width, n_cols)[take].astype(np.float32)
        if take.size else np.zeros((0, n_cols), dtype=np.float32),
        share_low=share, share_n=share_n, run_tokens=bp.run_tokens, rel_kl=rel, rel_band=band, rel_n=rel_n,
        findings=findings)


def heatmap(reader: TraceReader, cfg: KATConfig, tau: str | float = "auto", *,
            early: tuple[int, int] | None = None, late: tuple[int, int] | None = None, sort: str = "verdict",
            rows: int = 300, sample: int = 2000, max_cols: int = 256, rel_bins: int = 20, tau_sample: int = 4096,
            seed: int = 0, **filters: Any) -> HeatmapResult:
    """Build the heatmap of a store (see module docstring); reads lazily, two passes."""
    if sort not in SORT_KEYS:
        raise ValueError(f"--sort must be one of {SORT_KEYS}, got {sort!r}")
    from kat_diag.run.preflight import check_range

    check_range("--rows", rows, lo=1)
    check_range("--sample", sample, lo=1)
    scal = S.scan_scalars(reader, ["rollout_id", "step", "gen_len", "tau"], **filters)
    if scal["rollout_id"].size == 0:
        raise ValueError(f"no rollouts in {reader.dir} match the filters")
    derived = math.nan
    if needs_derived(scal["tau"], tau):
        derived = store_tau(reader, cfg, scal["rollout_id"], sample=tau_sample, seed=seed)
    width = column_width(int(scal["gen_len"].max()), max_cols)
    n_cols = math.ceil(max(int(scal["gen_len"].max()), 1) / width)
    stages = []
    for i, (name, rng) in enumerate(S.stage_ranges(scal["step"], early, late).items()):
        idx = np.flatnonzero(S.in_range(scal["step"], rng))
        pick = idx[S.sample_rows(idx.size, sample, seed + 1 + i)]
        batch = S.read_rollouts(reader, scal["rollout_id"][pick], ["step", "tau", "correct", "kl", "verdict",
                                                                   "stop_reason"])
        tau_R = resolve_tau(batch["tau"], tau, derived)
        stages.append(_stage(name, rng, int(idx.size), batch, tau_R, cfg, min(rows, sample), width, n_cols, sort,
                             rel_bins, seed))
    tau_info = {"mode": tau if isinstance(tau, str) else "fixed", "derived": None if math.isnan(derived) else derived,
                "recorded_share": float(np.isfinite(scal["tau"]).mean())}
    return HeatmapResult(stages=tuple(stages), width=width, n_cols=n_cols, sort=sort, tau=tau_info, cfg=cfg,
                         estimator=S.kl_estimator(reader))


# --------------------------------------------------------------------------------------------------
# Plot


def x_limit(result: HeatmapResult, quantile: float = X_QUANTILE) -> int:
    """Token position where the heatmaps' x axis ends: the quantile of the shown rows' lengths,
    rounded up to a multiple of 10 (at most the longest rollout)."""
    lengths = np.concatenate([s.length for s in result.stages]) if result.stages else np.zeros(0)
    full = result.n_cols * result.width
    if lengths.size == 0:
        return full
    q = int(math.ceil(float(np.quantile(lengths, quantile)) / 10.0) * 10)
    return int(min(full, max(q, 10)))


def _stage_tau(s: HeatmapStage) -> float | None:
    t = s.findings.get("tau_median")
    return t if t is not None and math.isfinite(t) else None


def plot(result: HeatmapResult, fig: Any = None, kl_range: tuple[float, float] | None = None) -> Any:
    """Draw the heatmaps (top) and the aggregate panels (bottom) on a figure; returns it."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle

    from kat_diag.analysis import style
    from kat_diag.analysis.stats import wilson

    kl_range = kl_range or style.KL_RANGE
    n_st = len(result.stages)
    if fig is None:
        fig, _ = style.figure(size=(style.TEXT_WIDTH, 7.6))
        fig.clf()
    gs = fig.add_gridspec(2, 6, height_ratios=[1.55, 1.0], hspace=0.62, wspace=1.3, top=0.9, bottom=0.07,
                          left=0.1, right=0.86)
    cmap = style.kl_cmap()
    xmax = x_limit(result)
    span = 6 // max(n_st, 1)
    im = None
    for i, s in enumerate(result.stages):
        ax = fig.add_subplot(gs[0, i * span:(i + 1) * span])
        n = s.kl_RC.shape[0]
        data = np.clip(s.kl_RC, kl_range[0], None)
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap=cmap,
                       norm=style.kl_norm(kl_range), extent=(0, result.n_cols * result.width, max(n, 1), 0))
        rows_y = np.arange(n) + 0.5
        on = s.onset >= 0
        cut = [Rectangle((float(o), float(r)), float(f - o + 1), 1.0) for o, f, r in
               zip(s.onset[on], s.fire[on], np.arange(n)[on], strict=True)]
        if cut:
            ax.add_collection(PatchCollection(cut, facecolor="none", edgecolor=style.CUT_SHADE, hatch="/////",
                                              linewidth=0.0, alpha=0.55))
        ax.scatter(s.onset[on], rows_y[on], marker="|", s=14, c=style.MARK_COLORS["onset"], linewidths=0.9,
                   path_effects=style.outline(1.8), label="onset", zorder=3)
        ax.scatter(s.fire[on] + 1, rows_y[on], marker="x", s=9, c=style.MARK_COLORS["fire"], linewidths=0.9,
                   path_effects=style.outline(1.8), label="fire", zorder=3)
        stripe = ax.inset_axes((-0.05, 0.0, 0.035, 1.0))
        colors = np.array([[_rgba(style.VERDICT_COLORS.get(str(v), style.VERDICT_COLORS["ungraded"]))]
                           for v in s.verdict]) if n else np.zeros((1, 1, 4))
        stripe.imshow(colors, aspect="auto", interpolation="nearest")
        stripe.set_axis_off()
        ax.set_xlim(0, xmax)
        longer = int((s.length > xmax).sum())
        ax.set_title(f"{s.name}: steps {s.steps[0]}-{s.steps[1]}\n{n} of {s.rollouts} rollouts, by {result.sort}",
                     fontsize=8)
        ax.set_xlabel(f"token position{'' if result.width == 1 else f' ({result.width} per column)'}"
                      + (f"; {longer} rows run past {xmax}" if longer else ""))
        if i == 0:
            ax.set_ylabel("row (see heatmap_rows.csv)", labelpad=12)
        ax.grid(False)
        step_tick = 50 if n > 120 else 20 if n > 40 else 5
        ax.set_yticks(np.arange(0, n, step_tick) + 0.5, [str(t) for t in range(0, n, step_tick)])
        ax.tick_params(axis="y", pad=9, labelsize=6)
    if im is not None:
        cax = fig.add_axes((0.885, 0.5, 0.014, 0.4))
        cb = fig.colorbar(im, cax=cax)
        taus = [t for t in (_stage_tau(s) for s in result.stages) if t is not None]
        extra = style.mark_tau(cb, float(np.median(taus)) if taus else None)
        cb.set_label(f"{result.estimator} (nats, log){extra}", fontsize=6.5)
    present = [v for v in style.VERDICTS if any((s.verdict == v).any() for s in result.stages)]
    handles = [Patch(facecolor=style.VERDICT_COLORS[v], label=style.VERDICT_LABELS[v]) for v in present]
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], marker="|", linestyle="none", color=style.MARK_COLORS["onset"], label="onset"),
                Line2D([], [], marker="x", linestyle="none", color=style.MARK_COLORS["fire"], label="fire"),
                Patch(facecolor="none", edgecolor=style.CUT_SHADE, hatch="/////", label="[onset, fire]: discarded")]
    fig.legend(handles=handles, loc="center", bbox_to_anchor=(0.47, 0.395), ncol=min(len(handles), 4),
               fontsize=6.5, handlelength=1.2, columnspacing=1.0, title="left stripe: verdict; marks",
               title_fontsize=6.5)

    ax1 = fig.add_subplot(gs[1, 0:2])
    ax2 = fig.add_subplot(gs[1, 2:4])
    ax3 = fig.add_subplot(gs[1, 4:6])
    x = (np.arange(result.n_cols) + 0.5) * result.width
    group_color = {"right": style.VERDICT_COLORS["right"], "not right": style.VERDICT_COLORS["wrong"],
                   "all": style.INK}
    for s in result.stages:
        ls = style.STAGE_STYLES.get(s.name, style.STAGE_STYLES["all"])
        for g, share in s.share_low.items():
            n_roll = s.share_n[g] / result.width
            enough = n_roll >= 20
            lo, hi = wilson(share * n_roll, n_roll)
            c = group_color.get(g, style.INK)
            ax1.plot(x[enough], share[enough], color=c, label=f"{s.name}, {g}", **ls)
            ax1.fill_between(x[enough], lo[enough], hi[enough], color=c, alpha=0.15, linewidth=0)
        for g, prof in s.rel_kl.items():
            c = group_color.get(g, style.INK)
            xr = (np.arange(len(prof)) + 0.5) / len(prof)
            ax3.plot(xr, prof, color=c, label=f"{s.name}, {g} (n={s.rel_n[g]})", **ls)
            ax3.fill_between(xr, s.rel_band[g][0], s.rel_band[g][1], color=c, alpha=0.15, linewidth=0)
        if s.run_tokens.size:
            lengths = np.sort(s.run_tokens)
            surv = 1.0 - np.arange(lengths.size) / lengths.size
            ax2.step(lengths, surv, where="post", color=style.INK, label=f"{s.name} ({s.run_tokens.size} runs)", **ls)
    ext = result.cfg.window + result.cfg.persistence - 1
    ax2.axvline(ext, color=style.MARK_COLORS["reference"], linewidth=0.8, linestyle=":",
                label=f">= T windows ({ext} tokens)")
    ax1.set_title("in an extended low-KL segment", fontsize=8)
    ax1.set_xlabel("token position")
    ax1.set_ylabel("share of running rollouts")
    ax1.set_xlim(0, xmax)
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=6)
    ax2.set_title("low-KL run lengths", fontsize=8)
    ax2.set_xlabel("run length (tokens)")
    ax2.set_yscale("log")
    ax2.set_ylabel("share of runs >= length")
    ax2.legend(fontsize=6)
    taus = [t for t in (_stage_tau(s) for s in result.stages) if t is not None]
    if taus:  # tau on every KL scale
        ax3.axhline(float(np.median(taus)), color=style.MARK_COLORS["tau"], linestyle="--", linewidth=0.8,
                    label="tau")
    ax3.set_title("mean KL by relative position", fontsize=8)
    ax3.set_xlabel("position / rollout length")
    # A sampled estimate (k1, imported) can average <= 0, and so can its tau: symlog keeps those visible.
    drawn = [y for line in ax3.get_lines() for y in np.asarray(line.get_ydata(), dtype=float) if np.isfinite(y)]
    if min(drawn, default=1.0) <= 0:
        ax3.set_ylabel("mean KL (nats, symlog)")
        ax3.set_yscale("symlog", linthresh=1e-3)
    else:
        ax3.set_ylabel("mean KL (nats, log)")
        ax3.set_yscale("log")
    ax3.legend(fontsize=6)
    tau = result.tau
    fig.suptitle(f"KL dynamics (tau {tau['mode']}"
                 + (f", derived {tau['derived']:.3g} nats" if tau.get("derived") else "")
                 + f"; W={result.cfg.window}, T={result.cfg.persistence}, L0={result.cfg.min_length};"
                 " bands: 95 % CI)", y=0.995)
    return fig


def _rgba(color: str) -> tuple[float, float, float, float]:
    from matplotlib.colors import to_rgba

    return to_rgba(color)


def rows_table(result: HeatmapResult) -> list[dict[str, Any]]:
    """The shown rows in display order: stage, row, rollout id, its `inspect` address, verdict, marks."""
    from kat_diag.views.rollout import address_text

    out = []
    for s in result.stages:
        for r in range(s.rollout_id.shape[0]):
            rid = int(s.rollout_id[r])
            out.append({"stage": s.name, "row": r, "rollout_id": rid, "step": int(s.step[r]),
                        "inspect": address_text(rid), "verdict": str(s.verdict[r]), "length": int(s.length[r]),
                        "onset": int(s.onset[r]), "fire": int(s.fire[r])})
    return out


def run_heatmap(run_dir: str | Path, out_dir: str | Path, *, cfg: KATConfig | None = None, tau: str | float = "auto",
                **options: Any) -> dict[str, Any]:
    """Compute, draw and save: ``heatmap.png``, ``heatmap.csv`` (aggregate curves with their bands,
    long form), ``heatmap_rows.csv`` (the shown rows: stage, row, rollout id, `inspect` address,
    verdict, length, onset, fire) and ``heatmap_rows.parquet`` (the same plus the binned KL).
    Returns the JSON-ready summary with the written paths. ``options``: those of `heatmap`."""
    from kat_diag.analysis import style
    from kat_diag.analysis.output import clean, write_csv, write_parquet
    from kat_diag.views.rollout import kat_config

    reader = TraceReader(run_dir)
    out = Path(out_dir)
    cfg = cfg or kat_config(reader.config)
    result = heatmap(reader, cfg, tau, **options)
    fig = plot(result)
    S.mark_estimator(fig, reader)  # a sampled-estimator store (k1 / k3) says so on the figure
    png = style.save(fig, out / "heatmap.png")
    csv_path = write_csv(out / "heatmap.csv", result.long_table())
    table = rows_table(result)
    rows_csv = write_csv(out / "heatmap_rows.csv", table)
    rows = {k: np.concatenate([getattr(s, k) for s in result.stages])
            for k in ("rollout_id", "step", "length", "onset", "fire", "correct")}
    rows["verdict"] = np.concatenate([s.verdict for s in result.stages]).astype(object)
    rows["stage"] = np.concatenate([np.full(s.rollout_id.shape[0], s.name) for s in result.stages])
    rows["row"] = np.concatenate([np.arange(s.rollout_id.shape[0]) for s in result.stages])
    rows["kl_binned"] = [r for s in result.stages for r in s.kl_RC]
    pq_path = write_parquet(out / "heatmap_rows.parquet", rows)
    return clean({**result.as_dict(), "kl_source": reader.kl_source, "x_limit": x_limit(result),
                  "files": [str(png), str(csv_path), str(rows_csv), str(pq_path)]})
