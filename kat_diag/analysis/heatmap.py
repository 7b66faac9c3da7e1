"""KL dynamics heatmaps: rollouts x token position, early vs late training (docs/diagnostics.md).

The paper's first picture of the agreement trap: each row a rollout, each column a token position,
colour the reverse KL on a log scale; rollouts that fall into sustained agreement show a dark band
that starts at some position and lasts to the end. This module draws it for a trace store, with the
detector's onset and fire marked (replayed with hindsight at the tau of
`kat_diag.analysis.threshold`), rows sortable by length, onset or correctness, an early and a late
stage side by side, and three aggregate panels computed over a larger seeded sample:

* the share of rollouts inside an extended low-KL segment (a run of >= T low windows) by position,
  right vs wrong rollouts;
* the distribution of the lengths of all low-window runs (tokens), with the extended threshold;
* the mean KL by relative position in the rollout (0 = first token, 1 = last), right vs wrong.

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

SORT_KEYS = ("length", "onset", "correct", "none")
GROUPS = ("right", "wrong")


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


def sort_order(key: str, length: np.ndarray, onset: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Row order for the heatmap: by ``length`` (longest first), ``onset`` (earliest first, not fired
    last, then by length), ``correct`` (wrong, ungraded, right; then by length) or ``none``."""
    length = np.asarray(length)
    n = length.shape[0]
    if key == "none":
        return np.arange(n)
    if key == "length":
        return np.lexsort((np.arange(n), -length))
    if key == "onset":
        on = np.where(np.asarray(onset) >= 0, onset, np.iinfo(np.int64).max)
        return np.lexsort((-length, on))
    if key == "correct":
        rank = np.select([np.asarray(correct) == 0, np.asarray(correct) == 1], [0, 2], 1)
        return np.lexsort((-length, rank))
    raise ValueError(f"--sort must be one of {SORT_KEYS}, got {key!r}")


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
    kl_RC: np.ndarray  # binned mean KL of the shown rows
    share_low: dict[str, np.ndarray]  # group -> share in an extended low-KL segment per column
    share_n: dict[str, np.ndarray]  # group -> tokens behind each share
    run_tokens: np.ndarray  # lengths of all maximal low-window runs of the sample
    rel_kl: dict[str, np.ndarray]  # group -> mean KL per relative-position bin
    findings: dict[str, float]


@dataclass(frozen=True)
class HeatmapResult:
    stages: tuple[HeatmapStage, ...]
    width: int  # tokens per column
    n_cols: int
    sort: str
    tau: dict[str, Any]
    cfg: KATConfig

    def as_dict(self) -> dict[str, Any]:
        def num(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "tau": self.tau, "tokens_per_column": self.width, "columns": self.n_cols, "sort": self.sort,
            "kat": {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
            "stages": [{"stage": s.name, "steps": list(s.steps), "rollouts": s.rollouts, "sampled": s.sampled,
                        "shown": int(s.rollout_id.shape[0]),
                        **{k: num(v) for k, v in s.findings.items()}} for s in self.stages],
        }

    def long_table(self) -> list[dict[str, Any]]:
        """The aggregate curves as rows (stage, panel, group, x, value, n) for the CSV."""
        out: list[dict[str, Any]] = []
        for s in self.stages:
            for g in s.share_low:
                for c in range(self.n_cols):
                    out.append({"stage": s.name, "panel": "share_in_low_run", "group": g,
                                "x": (c + 0.5) * self.width, "value": s.share_low[g][c], "n": int(s.share_n[g][c])})
            for g, prof in s.rel_kl.items():
                for i, v in enumerate(prof):
                    out.append({"stage": s.name, "panel": "mean_kl_by_relative_position", "group": g,
                                "x": (i + 0.5) / len(prof), "value": v, "n": None})
            lengths, counts = np.unique(s.run_tokens, return_counts=True)
            for length, n in zip(lengths.tolist(), counts.tolist(), strict=True):
                out.append({"stage": s.name, "panel": "low_run_length", "group": "all", "x": length,
                            "value": n, "n": n})
        return out


def _stage(name: str, steps: tuple[int, int], n_in_range: int, batch: Any, tau_R: np.ndarray, cfg: KATConfig,
           rows: int, width: int, n_cols: int, sort: str, rel_bins: int, seed: int) -> HeatmapStage:
    kl = batch["kl"]
    bp = batch_phases(kl.values, kl.offsets, cfg, tau_R)
    correct = batch["correct"]
    groups = {"right": correct == 1, "wrong": correct == 0}
    share, share_n, rel = {}, {}, {}
    for g, sel in groups.items():
        if sel.any():
            share[g], share_n[g] = position_share(bp.in_ext_tok, kl.offsets, sel, width, n_cols)
            rel[g] = relative_profile(kl.values, kl.offsets, sel, rel_bins)
    if not groups["right"].any() and not groups["wrong"].any():  # ungraded store
        every = np.ones(batch.num_rows, dtype=bool)
        share["all"], share_n["all"] = position_share(bp.in_ext_tok, kl.offsets, every, width, n_cols)
        rel["all"] = relative_profile(kl.values, kl.offsets, every, rel_bins)
    shown = S.sample_rows(batch.num_rows, rows, seed)
    order = shown[sort_order(sort, bp.length[shown], bp.onset[shown], correct[shown])]
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
        correct=correct[take], kl_RC=binned_mean(kl.values, kl.offsets, width, n_cols)[take].astype(np.float32)
        if take.size else np.zeros((0, n_cols), dtype=np.float32),
        share_low=share, share_n=share_n, run_tokens=bp.run_tokens, rel_kl=rel, findings=findings)


def heatmap(reader: TraceReader, cfg: KATConfig, tau: str | float = "auto", *,
            early: tuple[int, int] | None = None, late: tuple[int, int] | None = None, sort: str = "length",
            rows: int = 300, sample: int = 2000, max_cols: int = 256, rel_bins: int = 20, tau_sample: int = 4096,
            seed: int = 0, **filters: Any) -> HeatmapResult:
    """Build the heatmap of a store (see module docstring); reads lazily, two passes."""
    if sort not in SORT_KEYS:
        raise ValueError(f"--sort must be one of {SORT_KEYS}, got {sort!r}")
    if rows < 1 or sample < 1:
        raise ValueError("--rows and --sample must be >= 1")
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
        batch = S.read_rollouts(reader, scal["rollout_id"][pick], ["step", "tau", "correct", "kl"])
        tau_R = resolve_tau(batch["tau"], tau, derived)
        stages.append(_stage(name, rng, int(idx.size), batch, tau_R, cfg, min(rows, sample), width, n_cols, sort,
                             rel_bins, seed))
    tau_info = {"mode": tau if isinstance(tau, str) else "fixed", "derived": None if math.isnan(derived) else derived,
                "recorded_share": float(np.isfinite(scal["tau"]).mean())}
    return HeatmapResult(stages=tuple(stages), width=width, n_cols=n_cols, sort=sort, tau=tau_info, cfg=cfg)


# --------------------------------------------------------------------------------------------------
# Plot


def plot(result: HeatmapResult, fig: Any = None, kl_range: tuple[float, float] | None = None) -> Any:
    """Draw the heatmaps (top) and the aggregate panels (bottom) on a figure; returns it."""
    import matplotlib
    from matplotlib.colors import LogNorm, to_rgba

    from kat_diag.analysis import style

    kl_range = kl_range or style.KL_RANGE
    n_st = len(result.stages)
    if fig is None:
        fig, _ = style.figure(size=(6.2 * max(n_st, 2) + 1.2, 10.5))
        fig.clf()
    gs = fig.add_gridspec(2, 6, height_ratios=[1.5, 1.0], hspace=0.3, wspace=0.9, top=0.93)
    cmap = matplotlib.colormaps[style.KL_CMAP].with_extremes(bad="#E8E8E8")
    xmax = result.n_cols * result.width
    span = 6 // n_st
    im = None
    for i, s in enumerate(result.stages):
        ax = fig.add_subplot(gs[0, i * span:(i + 1) * span])
        n = s.kl_RC.shape[0]
        data = np.clip(s.kl_RC, kl_range[0], None)
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap=cmap,
                       norm=LogNorm(*kl_range), extent=(0, xmax, max(n, 1), 0))
        rows_y = np.arange(n) + 0.5
        on = s.onset >= 0
        ax.scatter(s.onset[on] + 0.5, rows_y[on], marker="|", s=40, c="#00E5FF", linewidths=1.8,
                   label="onset (replayed KAT)")
        ax.scatter(s.fire[on] + 0.5, rows_y[on], marker="x", s=8, c="white", linewidths=0.7, label="fire")
        stripe = ax.inset_axes((-0.035, 0.0, 0.02, 1.0))
        colors = np.array([to_rgba(style.OUTCOME_COLORS["right" if c == 1 else "wrong" if c == 0 else "ungraded"])
                           for c in s.correct]).reshape(-1, 1, 4) if n else np.zeros((1, 1, 4))
        stripe.imshow(colors, aspect="auto", interpolation="nearest")
        stripe.set_axis_off()
        ax.set_xlim(0, xmax)
        ax.set_title(f"{s.name}: steps {s.steps[0]}-{s.steps[1]} ({n} of {s.rollouts} rollouts, sorted by "
                     f"{result.sort})")
        ax.set_xlabel(f"token position (tokens; {result.width} per column)")
        ax.set_ylabel(f"{n} rollouts (stripe: green right, red wrong)", labelpad=14)
        ax.grid(False)
        ax.set_yticks([])
        if i == n_st - 1:
            ax.legend(loc="lower right", fontsize=7, facecolor="#333333", labelcolor="white", frameon=True)
    if im is not None:
        cax = fig.add_axes((0.92, 0.56, 0.012, 0.3))
        fig.colorbar(im, cax=cax, label="reverse KL (nats, log scale)")

    ax1 = fig.add_subplot(gs[1, 0:2])
    ax2 = fig.add_subplot(gs[1, 2:4])
    ax3 = fig.add_subplot(gs[1, 4:6])
    x = (np.arange(result.n_cols) + 0.5) * result.width
    for s in result.stages:
        ls = style.STAGE_STYLES.get(s.name, style.STAGE_STYLES["all"])
        for g, share in s.share_low.items():
            enough = s.share_n[g] >= 5 * result.width
            ax1.plot(x[enough], share[enough], color=style.OUTCOME_COLORS.get(g, "#555555"),
                     label=f"{s.name}, {g}", **ls)
        for g, prof in s.rel_kl.items():
            ax3.plot((np.arange(len(prof)) + 0.5) / len(prof), prof, color=style.OUTCOME_COLORS.get(g, "#555555"),
                     label=f"{s.name}, {g}", marker="o", markersize=2.5, **ls)
        if s.run_tokens.size:
            hi = int(s.run_tokens.max())
            bins = np.arange(result.cfg.window, hi + 2) - 0.5 if hi < 200 else 40
            ax2.hist(s.run_tokens, bins=bins, histtype="step", linewidth=1.4, linestyle=ls["linestyle"],
                     label=f"{s.name} ({s.run_tokens.size} runs)", color="#4C72B0" if s.name != "late" else "#DD8452")
    ext = result.cfg.window + result.cfg.persistence - 1
    ax2.axvline(ext, color="black", linewidth=0.8, linestyle=":", label=f"extended: >= T windows ({ext} tokens)")
    ax1.set_title("share in an extended low-KL segment")
    ax1.set_xlabel("token position (tokens)")
    ax1.set_ylabel("share of rollouts still running")
    ax1.set_ylim(0, 1)
    ax1.legend()
    ax2.set_title("low-KL run lengths")
    ax2.set_xlabel("run length (tokens)")
    most = max((int(np.bincount(s.run_tokens).max()) for s in result.stages if s.run_tokens.size), default=0)
    if most > 50:
        ax2.set_yscale("log")
    ax2.set_ylabel("runs" + (" (log scale)" if most > 50 else ""))
    ax2.legend(loc="best")
    ax3.set_title("mean KL by relative position")
    ax3.set_xlabel("relative position in rollout (0 = first token, 1 = last)")
    ax3.set_ylabel("mean reverse KL (nats, log scale)")
    ax3.set_yscale("log")
    ax3.legend()
    tau = result.tau
    fig.suptitle(f"KL dynamics: reverse KL per token (tau {tau['mode']}"
                 + (f", derived {tau['derived']:.3g} nats" if tau.get("derived") else "")
                 + f"; W={result.cfg.window}, T={result.cfg.persistence})", y=0.985)
    return fig


def run_heatmap(run_dir: str | Path, out_dir: str | Path, *, cfg: KATConfig | None = None, tau: str | float = "auto",
                **options: Any) -> dict[str, Any]:
    """Compute, draw and save: ``heatmap.png``, ``heatmap.csv`` (aggregate curves, long form) and
    ``heatmap_rows.parquet`` (the shown rows: ids, length, onset, fire, correct, binned KL).
    Returns the JSON-ready summary with the written paths. ``options``: those of `heatmap`."""
    from kat_diag.analysis import style
    from kat_diag.analysis.output import clean, write_csv, write_parquet
    from kat_diag.views.rollout import kat_config

    reader = TraceReader(run_dir)
    out = Path(out_dir)
    cfg = cfg or kat_config(reader.config)
    result = heatmap(reader, cfg, tau, **options)
    png = style.save(plot(result), out / "heatmap.png")
    csv_path = write_csv(out / "heatmap.csv", result.long_table())
    rows = {k: np.concatenate([getattr(s, k) for s in result.stages])
            for k in ("rollout_id", "step", "length", "onset", "fire", "correct")}
    rows["stage"] = np.concatenate([np.full(s.rollout_id.shape[0], s.name) for s in result.stages])
    rows["row"] = np.concatenate([np.arange(s.rollout_id.shape[0]) for s in result.stages])
    rows["kl_binned"] = [r for s in result.stages for r in s.kl_RC]
    pq_path = write_parquet(out / "heatmap_rows.parquet", rows)
    return clean({**result.as_dict(), "files": [str(png), str(csv_path), str(pq_path)]})
