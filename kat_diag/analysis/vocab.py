"""Teacher vocabulary shift (docs/diagnostics.md, paper §3.3): what the teacher proposes in each phase.

The paper shows word clouds of the teacher's top-5 tokens per position, per phase, and reads off a
shift from reasoning tokens to generic continuation once the student is in the agreement trap. This
module gives the same pictures and the numbers behind them, from the trace store alone (columns
teacher_top_ids / teacher_top_probs, phases from `kat_diag.analysis.phase_sample`):

* per phase, the counts of each token among the teacher's top-n ids (top-5 by default, as the
  paper; every position contributes each of its top ids once);
* Jensen-Shannon divergence between the phases' token distributions, natural log (identical = 0,
  disjoint = ln 2), with a bootstrap that resamples whole rollouts (the unit of dependence), all
  phases of a rollout together. The plug-in JS of sparse counts is biased upward (sampling noise
  alone makes two samples of one distribution differ) and the bootstrap inflates it again, so a
  percentile interval can exclude its own estimate; reported instead: the bias-corrected estimate
  2 JS - mean(JS*) and the basic bootstrap interval around it (`kat_diag.analysis.stats`);
* the categories of the teacher's top-1 token per phase (digit / operator / newline / answer
  marker / end of sequence / other), with 95 % bootstrap intervals over rollouts: the picture that
  means something for a character-level vocabulary, where word clouds would show single
  characters (word clouds, in the phase's colour, are drawn only for multi-character
  vocabularies);
* tokens ranked by the log-odds ratio of one phase against the other phases with an informative
  Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words"): z-scores, prior
  alpha_w = prior_scale x the pooled count of w. Counts are weighted by the teacher's probability
  by default (``weight="prob"``), so a token that is 5th at p ~ 1e-4 barely counts; only tokens
  holding at least MIN_SHARE of a phase's weight are ranked;
* the share of reasoning tokens among the top ids (a lexicon: digits and + - * = by default, a
  word list for real models);
* the teacher's entropy per phase from the stored top-n probabilities plus the remaining mass as
  one bucket. Merging the tail into one outcome can only lower entropy: a LOWER BOUND.

`compute_*` are pure; `run_vocab` reads a run lazily and writes vocab.png / vocab.csv / vocab.json.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from kat_diag.kat.phases import PHASE_NAMES

DEFAULT_LEXICON: tuple[str, ...] = (*"0123456789", "+", "-", "*", "=")
MIN_SHARE = 0.001  # tokens below this share of a phase's weight are not ranked as over-represented
CATEGORIES: tuple[str, ...] = ("digit", "operator", "newline", "answer marker", "end", "other")
_END_NAMES = {"<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|end|>", "<end>", "<|eot_id|>"}
_VISIBLE = {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "·"}


# ------------------------------------------------------------------------------------------------
# Pure math


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (natural log) between count vectors, row-wise on the last axis;
    each row is normalised first. In [0, ln 2]; NaN where a row sums to 0. Equals
    scipy.spatial.distance.jensenshannon(p, q) ** 2 (scipy returns the distance)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / p.sum(-1, keepdims=True)
        q = q / q.sum(-1, keepdims=True)
        m = 0.5 * (p + q)
        kl_pm = np.where(p > 0, p * np.log(p / np.where(m > 0, m, 1.0)), 0.0).sum(-1)
        kl_qm = np.where(q > 0, q * np.log(q / np.where(m > 0, m, 1.0)), 0.0).sum(-1)
    out = np.clip(0.5 * (kl_pm + kl_qm), 0.0, np.log(2.0))
    bad = ~(np.isfinite(p).all(-1) & np.isfinite(q).all(-1))
    return np.where(bad, np.nan, out)


def bootstrap_js(counts_a_RV: sp.csr_matrix, counts_b_RV: sp.csr_matrix, n_boot: int = 1000, seed: int = 0,
                 chunk: int = 100) -> dict[str, float]:
    """JS between the pooled rows of two per-rollout count matrices (same rollouts, same columns),
    with a bootstrap over rollouts: each replicate draws R rollouts with replacement and pools both
    phases' counts of the drawn rollouts. Returns the plug-in estimate ``js``, the bias-corrected
    ``js_bc`` = 2 js - mean(js*), the basic 95 % interval ``ci_low``/``ci_high`` around it (clipped to
    [0, ln 2]), the raw percentiles ``pct_low``/``pct_high``, the bias and the valid replicates."""
    R = counts_a_RV.shape[0]
    point = float(js_divergence(np.asarray(counts_a_RV.sum(0)).ravel(), np.asarray(counts_b_RV.sum(0)).ravel()))
    rng = np.random.default_rng(seed)
    reps = []
    At, Bt = counts_a_RV.T.tocsr(), counts_b_RV.T.tocsr()
    for c0 in range(0, n_boot, chunk):
        b = min(chunk, n_boot - c0)
        W_RB = rng.multinomial(R, np.full(R, 1.0 / R), size=b).T.astype(np.float64) if R else np.zeros((0, b))
        reps.append(js_divergence((At @ W_RB).T, (Bt @ W_RB).T))
    from kat_diag.analysis.stats import basic_interval

    boot = np.concatenate(reps) if reps else np.zeros(0)
    ok = boot[np.isfinite(boot)]
    b = basic_interval(point, ok, 0.95, (0.0, float(np.log(2.0))))
    return {"js": point, "js_bc": b["estimate"], "ci_low": b["lo"], "ci_high": b["hi"], "bias": b["bias"],
            "pct_low": b["pct_lo"], "pct_high": b["pct_hi"],
            "boot_mean": float(ok.mean()) if len(ok) else float("nan"), "n_boot": int(len(ok))}


def log_odds_z(counts_i: np.ndarray, counts_j: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Monroe et al. (2008) log-odds ratio of each word in group i vs group j with an informative
    Dirichlet prior alpha (per word), as z-scores delta / sqrt(var):

    delta_w = log((y_iw + a_w) / (n_i + a0 - y_iw - a_w)) - log((y_jw + a_w) / (n_j + a0 - y_jw - a_w)),
    var_w ~ 1 / (y_iw + a_w) + 1 / (y_jw + a_w),  a0 = sum_w a_w.  Words with a_w = 0 get z = 0."""
    yi = np.asarray(counts_i, dtype=np.float64)
    yj = np.asarray(counts_j, dtype=np.float64)
    a = np.asarray(prior, dtype=np.float64)
    ni, nj, a0 = yi.sum(), yj.sum(), a.sum()
    ok = a > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = (np.log((yi + a) / (ni + a0 - yi - a)) - np.log((yj + a) / (nj + a0 - yj - a)))
        z = delta / np.sqrt(1.0 / (yi + a) + 1.0 / (yj + a))
    return np.where(ok & np.isfinite(z), z, 0.0)


def teacher_entropy_lower_bound(top_probs_NK: np.ndarray) -> np.ndarray:
    """Per position: entropy (nats) of the stored top-n probabilities plus the tail 1 - sum as one
    outcome. A lower bound of the teacher's full entropy (grouping outcomes never raises entropy).
    NaN entries (absent columns) count as 0."""
    p = np.nan_to_num(np.asarray(top_probs_NK, dtype=np.float64), nan=0.0).clip(0.0, 1.0)
    tail = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1) - np.where(tail > 0, tail * np.log(tail), 0.0)
    return h


def visible_token(text: str) -> str:
    """A printable name for a token's text: whitespace and newlines become visible (\\n, ·)."""
    if text == "":
        return "<empty>"
    if text == " ":
        return "<sp>"
    return "".join(_VISIBLE.get(c, c) for c in text)


def reasoning_mask(texts: Sequence[str], lexicon: Iterable[str] = DEFAULT_LEXICON) -> np.ndarray:
    """True for tokens whose stripped text is a lexicon entry, or is made only of characters that
    are single-character entries (so with the default lexicon "12" and "+=" count, "the" does not)."""
    words = {w.strip() for w in lexicon if w.strip()}
    chars = {w for w in words if len(w) == 1}
    out = np.zeros(len(texts), dtype=bool)
    for i, t in enumerate(texts):
        s = t.strip()
        out[i] = bool(s) and (s in words or all(c in chars for c in s))
    return out


def token_category(names: Sequence[str], end_ids: Sequence[bool] | None = None) -> np.ndarray:
    """CATEGORIES index of each token by its visible name: digits, operators (+ - * / = ^ ( )),
    newline, the answer marker (#, ####, \\boxed), end of sequence (special end tokens), other."""
    out = np.full(len(names), CATEGORIES.index("other"), dtype=np.int64)
    for i, n in enumerate(names):
        t = n.replace("·", " ").strip()
        if (end_ids is not None and end_ids[i]) or n in _END_NAMES:
            out[i] = CATEGORIES.index("end")
        elif n in ("\\n", "\n") or set(n) <= {"\\", "n"} and "\\n" in n:
            out[i] = CATEGORIES.index("newline")
        elif t and t.strip("#") == "" or "boxed" in t:
            out[i] = CATEGORIES.index("answer marker")
        elif t and all(c.isdigit() for c in t):
            out[i] = CATEGORIES.index("digit")
        elif t and all(c in "+-*/=^()×÷" for c in t):
            out[i] = CATEGORIES.index("operator")
    return out


def character_level(names: Sequence[str], counts: np.ndarray) -> bool:
    """Whether the used vocabulary is (almost) single characters: >= 90 % of the counted weight on
    tokens whose visible name is one character (word clouds of such tokens say nothing)."""
    w = np.asarray(counts, dtype=np.float64).sum(0) if np.ndim(counts) == 2 else np.asarray(counts, float)
    single = np.array([len(n) == 1 or n in ("\\n", "<sp>") for n in names], dtype=bool)
    total = w.sum()
    return bool(total > 0 and w[single].sum() >= 0.9 * total)


@dataclass(frozen=True)
class VocabResult:
    """Per-phase teacher top-token statistics (phases with no tokens are left out)."""

    phases: tuple[str, ...]
    token_ids: np.ndarray  # V' used token ids (columns of counts)
    names: tuple[str, ...]  # visible name of each used token
    counts: np.ndarray  # phases x V' top-id counts (or probability-weighted counts)
    z: np.ndarray  # phases x V' log-odds z of the phase vs the other phases
    positions: dict[str, int]  # token positions per phase
    rollouts: dict[str, int]  # rollouts with at least one token of the phase
    reasoning_share: dict[str, float]
    entropy_lb: dict[str, float]  # mean teacher entropy lower bound per position (nats)
    js: tuple[dict[str, Any], ...]  # per phase pair: a, b, js, js_bc, ci_low, ci_high, bias, ...
    top_n: int = 5  # teacher top ids counted per position
    reasoning_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    entropy_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    # phase -> category -> (share, lo, hi) of the teacher's top-1 token
    categories: dict[str, dict[str, tuple[float, float, float]]] = field(default_factory=dict)
    weight: str = "count"

    def top_tokens(self, phase: str, n: int = 10, by: str = "z", min_share: float = 0.0) -> list[dict[str, Any]]:
        """The n tokens of a phase with the highest log-odds z (by="z") or count (by="count"), among
        those holding at least ``min_share`` of the phase's weight."""
        i = self.phases.index(phase)
        key = self.z[i] if by == "z" else self.counts[i].astype(np.float64)
        total = float(self.counts[i].sum()) or 1.0
        order = np.lexsort((-self.counts[i], -key))
        order = [j for j in order if self.counts[i, j] > 0 and self.counts[i, j] >= min_share * total][:n]
        return [{"token_id": int(self.token_ids[j]), "token": self.names[j], "count": float(self.counts[i, j]),
                 "share": float(self.counts[i, j] / total), "z": float(self.z[i, j])} for j in order]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        return {"phases": list(self.phases), "positions": self.positions, "rollouts": self.rollouts,
                "weight": self.weight, "top_ids_counted": float(self.counts.sum()),
                "reasoning_share": self.reasoning_share,
                "reasoning_share_ci": {p: list(v) for p, v in self.reasoning_ci.items()},
                "teacher_entropy_lower_bound": self.entropy_lb,
                "teacher_entropy_lower_bound_ci": {p: list(v) for p, v in self.entropy_ci.items()},
                "js": [dict(j) for j in self.js],
                "top1_categories": {p: {c: {"share": v[0], "lo": v[1], "hi": v[2]} for c, v in cats.items()}
                                    for p, cats in self.categories.items()},
                "top_log_odds": {p: self.top_tokens(p, top, min_share=MIN_SHARE) for p in self.phases},
                "top_counts": {p: self.top_tokens(p, top, by="count") for p in self.phases}}


def _ratio_ci(num_R: np.ndarray, den_R: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    from kat_diag.analysis.stats import cluster_bootstrap, percentile_interval

    keep = np.asarray(den_R) > 0
    if keep.sum() < 2:
        return float("nan"), float("nan")
    lo, hi = percentile_interval(cluster_bootstrap(np.asarray(num_R)[keep], np.asarray(den_R)[keep], n_boot, seed))
    return float(lo), float(hi)


def compute_vocab(counts_RV: Mapping[str, sp.csr_matrix], names: Sequence[str], token_ids: np.ndarray,
                  entropy_sum: Mapping[str, float], positions: Mapping[str, int],
                  lexicon: Iterable[str] = DEFAULT_LEXICON, n_boot: int = 1000, prior_scale: float = 1.0,
                  seed: int = 0, top_n: int = 5, entropy_R: Mapping[str, np.ndarray] | None = None,
                  positions_R: Mapping[str, np.ndarray] | None = None,
                  top1_RV: Mapping[str, sp.csr_matrix] | None = None, end_ids: Sequence[bool] | None = None,
                  weight: str = "count") -> VocabResult:
    """Vocabulary statistics from per-rollout top-id counts.

    counts_RV: phase -> (rollouts x V') sparse counts, rows aligned across phases (same rollouts);
    names / token_ids: the V' columns. entropy_sum / positions: per phase, the sum of per-position
    entropy lower bounds and the number of positions. Optional, for intervals over rollouts:
    entropy_R / positions_R (per rollout, aligned with the count rows) and top1_RV (per rollout,
    counts of the teacher's top-1 id) for the top-1 categories; end_ids marks end-of-sequence columns.
    """
    phases = tuple(p for p in PHASE_NAMES if p in counts_RV and positions.get(p, 0) > 0)
    C = np.stack([np.asarray(counts_RV[p].sum(0)).ravel() for p in phases]) if phases else np.zeros((0, len(names)))
    pooled = C.sum(0)
    z = np.zeros_like(C, dtype=np.float64)
    for i in range(len(phases)):
        z[i] = log_odds_z(C[i], pooled - C[i], prior_scale * pooled)
    reason = reasoning_mask([n.replace("·", " ") for n in names], lexicon)
    share = {p: float(C[i, reason].sum() / C[i].sum()) if C[i].sum() else float("nan") for i, p in enumerate(phases)}
    reason_ci = {}
    for i, p in enumerate(phases):
        m = counts_RV[p]
        reason_ci[p] = _ratio_ci(np.asarray(m[:, reason].sum(1)).ravel(), np.asarray(m.sum(1)).ravel(), n_boot,
                                 seed + 31 * i)
    entropy_ci = {}
    if entropy_R is not None and positions_R is not None:
        for i, p in enumerate(phases):
            entropy_ci[p] = _ratio_ci(entropy_R[p], positions_R[p], n_boot, seed + 37 * i)
    cats: dict[str, dict[str, tuple[float, float, float]]] = {}
    if top1_RV is not None:
        cat_of = token_category(names, end_ids)
        for i, p in enumerate(phases):
            if p not in top1_RV:
                continue
            m = top1_RV[p]
            tot_R = np.asarray(m.sum(1)).ravel()
            cats[p] = {}
            for c, cname in enumerate(CATEGORIES):
                num_R = np.asarray(m[:, cat_of == c].sum(1)).ravel()
                total = tot_R.sum()
                lo, hi = _ratio_ci(num_R, tot_R, n_boot, seed + 41 * i + c)
                cats[p][cname] = (float(num_R.sum() / total) if total else float("nan"), lo, hi)
    js = []
    for a in range(len(phases)):
        for b in range(a + 1, len(phases)):
            res = bootstrap_js(counts_RV[phases[a]], counts_RV[phases[b]], n_boot=n_boot, seed=seed + 17 * a + b)
            js.append({"a": phases[a], "b": phases[b], **res})
    rollouts = {p: int((counts_RV[p].getnnz(axis=1) > 0).sum()) for p in phases}
    return VocabResult(
        phases=phases, token_ids=np.asarray(token_ids), names=tuple(names), counts=C, z=z,
        positions={p: int(positions[p]) for p in phases}, rollouts=rollouts, reasoning_share=share,
        entropy_lb={p: float(entropy_sum[p] / positions[p]) for p in phases}, js=tuple(js), top_n=top_n,
        reasoning_ci=reason_ci, entropy_ci=entropy_ci, categories=cats, weight=weight)


# ------------------------------------------------------------------------------------------------
# Plot (reads only the result)


def _dot(ax: Any, y: float, v: float, lo: float, hi: float, color: str, marker: str = "o",
         hollow: bool = False) -> None:
    from kat_diag.analysis import style

    if np.isfinite(lo) and np.isfinite(hi):
        ax.plot([lo, hi], [y, y], color=color, linewidth=1.4)
    if np.isfinite(v):
        ax.plot([v], [y], marker=marker, color=color, markerfacecolor=style.PAPER if hollow else color,
                markersize=4.5, linestyle="none")


def plot_vocab(result: VocabResult, fig: Any = None, top: int = 8) -> Any:
    """The teacher's vocabulary per phase, every number with a 95 % interval over rollouts:
    the categories of its top-1 token (dot plot), the JS divergence between phases (bias-corrected,
    basic bootstrap interval; hollow: plug-in), the reasoning-token share, the entropy lower bound,
    and the most over-represented tokens per phase (log-odds z). Word clouds in each phase's colour
    head the figure only for a multi-character vocabulary."""
    from matplotlib.lines import Line2D

    from kat_diag.analysis import style

    phases = result.phases
    clouds = not character_level(result.names, result.counts) and len(phases) > 0
    ncol = 3
    if fig is None:
        fig = style.figure(size=(style.TEXT_WIDTH, 7.2 if clouds else 5.0))[0]
        fig.clf()
    rows = ([1.0] if clouds else []) + [1.25, 0.9]
    gs = fig.add_gridspec(len(rows), 6, height_ratios=rows, hspace=0.55, wspace=2.4, left=0.14, right=0.97, top=0.9,
                          bottom=0.1)
    r0 = 0
    if clouds:
        from wordcloud import WordCloud

        for i in range(ncol):
            ax = fig.add_subplot(gs[0, 2 * i:2 * i + 2])
            ax.axis("off")
            if i >= len(phases):
                continue
            ph = phases[i]
            freq = {n: float(c) for n, c in zip(result.names, result.counts[i], strict=True) if c > 0}
            if not freq:
                ax.set_title(f"{ph}: no teacher top-n tokens stored", color=style.PHASE_COLORS.get(ph))
                continue
            color = style.PHASE_COLORS.get(ph, style.INK)
            wc = WordCloud(width=500, height=320, background_color=style.PAPER, random_state=0, prefer_horizontal=1.0,
                           min_font_size=8, max_words=60, collocations=False,
                           color_func=lambda *a, color=color, **k: color).generate_from_frequencies(freq)
            ax.imshow(wc.to_array(), interpolation="bilinear")
            ax.set_title(f"{ph}: teacher top-{result.top_n}", color=color, fontsize=8)
        r0 = 1
    # top-1 categories
    ax = fig.add_subplot(gs[r0, 0:4])
    if result.categories:
        present = [c for c in CATEGORIES if any(result.categories.get(p, {}).get(c, (0,))[0] > 0 for p in phases)]
        for j, ph in enumerate(phases):
            cats = result.categories.get(ph, {})
            off = (j - (len(phases) - 1) / 2) * 0.24
            for i, c in enumerate(present):
                v, lo, hi = cats.get(c, (np.nan, np.nan, np.nan))
                _dot(ax, i + off, v, lo, hi, style.PHASE_COLORS.get(ph, style.INK))
        ax.set_yticks(np.arange(len(present)), present)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of positions where the teacher's top-1 is ...")
        ax.legend(handles=[Line2D([], [], marker="o", linestyle="none", color=style.PHASE_COLORS.get(p, style.INK),
                                  label=f"{p} ({result.positions[p]} positions, {result.rollouts[p]} rollouts)")
                           for p in phases], fontsize=6, loc="lower right")
    else:
        style.no_panel(ax, "top-1 categories: not computed")
    ax.set_title("what the teacher proposes: its top-1 token", fontsize=8)
    # JS
    ax = fig.add_subplot(gs[r0, 4:6])
    for i, j in enumerate(result.js):
        _dot(ax, i, j.get("js_bc", j["js"]), j["ci_low"], j["ci_high"], style.INK)
        _dot(ax, i, j["js"], np.nan, np.nan, style.INK, hollow=True)
    ax.set_yticks(np.arange(len(result.js)), [f"{j['a'][:5]}-{j['b'][:5]}" for j in result.js])
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel("JS divergence (nats; max ln 2)")
    ax.set_title("JS between phases", fontsize=8)
    ax.legend(handles=[Line2D([], [], marker="o", linestyle="none", color=style.INK, label="bias-corrected"),
                       Line2D([], [], marker="o", linestyle="none", color=style.INK, markerfacecolor=style.PAPER,
                              label="plug-in")], fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.25),
              ncol=2)
    # bottom row: over-represented tokens (one small panel per phase), reasoning share, entropy
    ax = fig.add_subplot(gs[r0 + 1, 0:2])
    for i, ph in enumerate(phases):
        c = style.PHASE_COLORS.get(ph, style.INK)
        lo, hi = result.reasoning_ci.get(ph, (np.nan, np.nan))
        _dot(ax, i, result.reasoning_share[ph], lo, hi, c)
    ax.set_yticks(np.arange(len(phases)), phases)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of top ids in the lexicon")
    ax.set_title("reasoning-token share", fontsize=8)
    ax = fig.add_subplot(gs[r0 + 1, 2:4])
    for i, ph in enumerate(phases):
        c = style.PHASE_COLORS.get(ph, style.INK)
        lo, hi = result.entropy_ci.get(ph, (np.nan, np.nan))
        _dot(ax, i, result.entropy_lb[ph], lo, hi, c)
    ax.set_yticks(np.arange(len(phases)), phases)
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel("nats per position (lower bound)")
    ax.set_title("teacher entropy", fontsize=8)
    ax = fig.add_subplot(gs[r0 + 1, 4:6])
    ax.axis("off")
    lines = []
    for ph in phases:
        toks = result.top_tokens(ph, top, min_share=MIN_SHARE)
        pos = [t for t in toks if t["z"] > 1.96][:5]
        lines.append((ph, ", ".join(f"{t['token']} ({t['z']:.0f})" for t in pos) or "none with z > 1.96"))
    ax.set_title("over-represented (z)", fontsize=8)
    for i, (ph, text) in enumerate(lines):
        ax.text(0.0, 0.85 - 0.3 * i, f"{ph}: {text}", transform=ax.transAxes, fontsize=6.5,
                color=style.PHASE_COLORS.get(ph, style.INK), wrap=True)
    weight = "probability-weighted" if result.weight == "prob" else "counted"
    fig.suptitle(f"Teacher vocabulary per phase (top-{result.top_n} ids, {weight}; 95 % CIs over rollouts)")
    return fig


def write_csv(result: VocabResult, path: str | Path) -> None:
    """One row per (phase, token) with a non-zero weight: phase, token_id, token, weight (a count, or
    the summed teacher probability with weight=prob), share, z."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "token_id", "token", "weight", "share", "z_log_odds"])
        for i, ph in enumerate(result.phases):
            total = float(result.counts[i].sum()) or 1.0
            for j in np.argsort(-result.counts[i], kind="stable"):
                c = float(result.counts[i, j])
                if c <= 0:
                    break
                w.writerow([ph, int(result.token_ids[j]), result.names[j], f"{c:.6g}", f"{c / total:.6g}",
                            f"{float(result.z[i, j]):.6g}"])


# ------------------------------------------------------------------------------------------------
# Reading a run


def accumulate_store(reader, tau_fixed: float | None, cfg, top: int, weight: str = "prob",
                     steps: tuple[int | None, int | None] | None = None, collect_text: bool = False
                     ) -> dict[str, Any]:
    """One lazy pass over the store: per phase, per-rollout counts of the teacher's top-`top` ids
    (sparse), entropy sums and positions (in total and per rollout), the teacher's top-1 id per
    position; with collect_text, an id -> text map from the stored token_text of the sampled tokens
    (names for runs without a tokenizer at hand)."""
    from kat_diag.analysis.phase_sample import label_tokens, rollout_tau

    cols = ["tau", "kl", "teacher_top_ids", "teacher_top_probs"]
    if collect_text:
        cols += ["token_ids", "token_text"]
    text_of: dict[int, str] = {}
    rows: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PHASE_NAMES))}
    toks: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PHASE_NAMES))}
    wts: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PHASE_NAMES))}
    ent = np.zeros(len(PHASE_NAMES))
    pos = np.zeros(len(PHASE_NAMES), dtype=np.int64)
    ent_R: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PHASE_NAMES))}
    pos_R: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PHASE_NAMES))}
    top1_rows: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PHASE_NAMES))}
    top1_ids: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PHASE_NAMES))}
    base = 0
    defined = 0
    for b in reader.iter_batches(cols, steps=steps):
        kl = b["kl"]
        tau_R = rollout_tau(b["tau"], tau_fixed)
        defined += int(np.isfinite(tau_R).sum())
        labels = label_tokens(kl.values, kl.offsets, tau_R, cfg)
        ids_NK = b["teacher_top_ids"].values[:, :top]
        probs_NK = b["teacher_top_probs"].values[:, :top]
        h_N = teacher_entropy_lower_bound(b["teacher_top_probs"].values)
        rollout_N = np.repeat(np.arange(b.num_rows), kl.lengths) + base
        for i in range(len(PHASE_NAMES)):
            sel = labels == i
            if not sel.any():
                continue
            ent[i] += float(h_N[sel].sum())
            pos[i] += int(sel.sum())
            first = ids_NK[sel][:, 0]
            ok1 = first >= 0
            top1_rows[i].append(rollout_N[sel][ok1])
            top1_ids[i].append(first[ok1].astype(np.int64))
            ids = ids_NK[sel]
            ok = ids >= 0
            rows[i].append(np.broadcast_to(rollout_N[sel][:, None], ids.shape)[ok])
            toks[i].append(ids[ok].astype(np.int64))
            wts[i].append(np.ones(int(ok.sum())) if weight == "count" else np.nan_to_num(probs_NK[sel][ok]))
        for i in range(len(PHASE_NAMES)):  # per rollout, aligned with the count rows (zeros where absent)
            sel = labels == i
            local = rollout_N[sel] - base
            ent_R[i].append(np.bincount(local, weights=h_N[sel], minlength=b.num_rows))
            pos_R[i].append(np.bincount(local, minlength=b.num_rows))
        if collect_text:
            ids, first = np.unique(b["token_ids"].values, return_index=True)
            texts = b["token_text"].values
            for t, j in zip(ids.tolist(), first.tolist(), strict=True):
                if t not in text_of and j < len(texts) and isinstance(texts[j], str):
                    text_of[t] = texts[j]
        base += b.num_rows
    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0)

    return {"rows": rows, "toks": toks, "wts": wts, "entropy": ent, "positions": pos, "rollouts": base,
            "defined": defined, "text_of": text_of, "entropy_R": {i: cat(v) for i, v in ent_R.items()},
            "positions_R": {i: cat(v) for i, v in pos_R.items()},
            "top1_rows": {i: cat(v).astype(np.int64) for i, v in top1_rows.items()},
            "top1_ids": {i: cat(v).astype(np.int64) for i, v in top1_ids.items()}}


def _decode_names(ids: np.ndarray, tokenizer, text_of: Mapping[int, str] | None = None) -> list[str]:
    """Visible names: the tokenizer's decoding, else the stored token_text, else <id>."""
    if tokenizer is not None:
        return [visible_token(tokenizer.decode([int(i)])) for i in ids]
    text_of = text_of or {}
    return [visible_token(text_of[int(i)]) if int(i) in text_of else f"<{int(i)}>" for i in ids]


def run_vocab(run_dir: str | Path, out_dir: str | Path, *, traces: str | Path | None = None,
              tau: str | float | None = "recorded", tokenizer: str | Path | None = None,
              lexicon: str | Path | None = None, top: int = 5, weight: str = "prob", n_boot: int = 1000,
              prior_scale: float = 1.0, steps: tuple[int | None, int | None] | None = None,
              kat: Mapping[str, Any] | None = None, seed: int = 0, name: str = "vocab") -> dict[str, Any]:
    """Teacher vocabulary per phase of a run: writes OUT/NAME.png, NAME.csv (phase x token counts and
    z-scores) and NAME.json (the returned summary). tokenizer: default the run's student tokenizer
    (config.json), else ids are shown as <id>. lexicon: a word-list file (one entry per line)."""
    from kat_diag.analysis import style
    from kat_diag.analysis.phase_sample import kat_config_of, parse_tau, resolve_tau, run_config
    from kat_diag.traces.reader import TraceReader

    if weight not in ("count", "prob"):
        raise ValueError(f"--weight must be count or prob, got {weight!r}")
    from kat_diag.run.preflight import check_range

    check_range("--top", top, lo=1)
    check_range("--boot", n_boot, lo=1)
    check_range("--prior-scale", prior_scale, lo=0, lo_open=True)
    run = Path(run_dir)
    config = run_config(run)
    cfg = kat_config_of(config, **dict(kat or {}))
    tau_fixed = parse_tau(tau)
    lex: Sequence[str] = DEFAULT_LEXICON
    if lexicon is not None:
        p = Path(lexicon)
        if not p.exists():
            raise FileNotFoundError(f"--lexicon file does not exist: {p}")
        lex = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    reader = TraceReader(traces if traces is not None else run)
    tau_fixed = resolve_tau(tau_fixed, reader, cfg.window, steps)
    top = min(top, reader.top_n)
    tok_path = tokenizer or config.get("student")
    if tok_path and not Path(tok_path).exists():
        if tokenizer is not None:
            raise FileNotFoundError(f"--tokenizer path does not exist: {tokenizer}")
        tok_path = None  # the run's student is gone: fall back to the stored token_text
    acc = accumulate_store(reader, tau_fixed, cfg, top, weight=weight, steps=steps, collect_text=not tok_path)
    if acc["defined"] == 0:
        raise ValueError(f"no rollouts with a defined phase in {reader.dir}: every recorded tau is NaN "
                         "(KAT inactive); pass --tau VALUE")
    all_toks = [t for i in acc["toks"] for t in acc["toks"][i]]
    used = np.unique(np.concatenate(all_toks)) if all_toks else np.zeros(0, dtype=np.int64)
    R = acc["rollouts"]
    counts = {}
    for i, ph in enumerate(PHASE_NAMES):
        if not acc["rows"][i]:
            continue
        r = np.concatenate(acc["rows"][i])
        c = np.searchsorted(used, np.concatenate(acc["toks"][i]))
        counts[ph] = sp.csr_matrix((np.concatenate(acc["wts"][i]), (r, c)), shape=(R, len(used)))
    top1 = {ph: sp.csr_matrix((np.ones(len(acc["top1_rows"][i])),
                               (acc["top1_rows"][i], np.searchsorted(used, acc["top1_ids"][i]))), shape=(R, len(used)))
            for i, ph in enumerate(PHASE_NAMES) if ph in counts}
    ent_R = {ph: acc["entropy_R"][i] for i, ph in enumerate(PHASE_NAMES) if ph in counts}
    pos_R = {ph: acc["positions_R"][i] for i, ph in enumerate(PHASE_NAMES) if ph in counts}
    # Bootstrap over the rollouts that have phases (those with an undefined tau carry no tokens).
    if counts:
        has = np.zeros(R, dtype=bool)
        for m in counts.values():
            has |= m.getnnz(axis=1) > 0
        counts = {ph: m[has] for ph, m in counts.items()}
        top1 = {ph: m[has] for ph, m in top1.items()}
        ent_R = {ph: v[has] for ph, v in ent_R.items()}
        pos_R = {ph: v[has] for ph, v in pos_R.items()}
    tok = None
    if tok_path:
        from kat_diag.models import load_tokenizer

        tok = load_tokenizer(tok_path, what="--tokenizer")
    names = _decode_names(used, tok, acc["text_of"])
    eos = set() if tok is None else {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    result = compute_vocab(counts, names, used,
                           {p: float(acc["entropy"][i]) for i, p in enumerate(PHASE_NAMES)},
                           {p: int(acc["positions"][i]) for i, p in enumerate(PHASE_NAMES)},
                           lexicon=lex, n_boot=n_boot, prior_scale=prior_scale, seed=seed, top_n=top,
                           entropy_R=ent_R, positions_R=pos_R, top1_RV=top1,
                           end_ids=[int(t) in eos for t in used], weight=weight)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / f"{name}.csv")
    style.save(plot_vocab(result), out / f"{name}.png")
    from kat_diag.analysis.output import shown_path

    summary = {"run": shown_path(run), "traces": shown_path(reader.dir), "tau_option": str(tau),
               "tau": "recorded" if tau_fixed is None else tau_fixed,
               "top": top, "weight": weight,
               "lexicon": "default (digits, + - * =)" if lexicon is None else str(lexicon),
               "rollouts_read": R, "rollouts_with_phases": acc["defined"],
               "entropy_note": "lower bound: top-n probabilities plus the tail mass as one bucket",
               "files": {"png": str(out / f"{name}.png"), "csv": str(out / f"{name}.csv"),
                         "json": str(out / f"{name}.json")},
               **result.to_dict()}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
