"""Teacher vocabulary shift (docs/diagnostics.md, paper §3.3): what the teacher proposes in each phase.

The paper shows word clouds of the teacher's top-5 tokens per position, per phase, and reads off a
shift from reasoning tokens to generic continuation once the student is in the agreement trap. This
module gives the same pictures and the numbers behind them, from the trace store alone (columns
teacher_top_ids / teacher_top_probs, phases from `kat_diag.analysis.phase_sample`):

* per phase, the counts of each token among the teacher's top-n ids (top-5 by default, as the
  paper; every position contributes each of its top ids once);
* Jensen-Shannon divergence between the phases' token distributions, natural log (identical = 0,
  disjoint = ln 2), with a bootstrap 95 % percentile interval that resamples whole rollouts (the
  unit of dependence), all phases of a rollout together;
* tokens ranked by the log-odds ratio of one phase against the other phases with an informative
  Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words"): z-scores, prior
  alpha_w = prior_scale x the pooled count of w;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from kat_diag.kat.phases import PHASE_NAMES

DEFAULT_LEXICON: tuple[str, ...] = (*"0123456789", "+", "-", "*", "=")
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
    phases' counts of the drawn rollouts. Returns point estimate, 2.5/97.5 % percentiles, the
    bootstrap mean (its gap to the point estimate is the plug-in bias) and valid replicates."""
    R = counts_a_RV.shape[0]
    point = float(js_divergence(np.asarray(counts_a_RV.sum(0)).ravel(), np.asarray(counts_b_RV.sum(0)).ravel()))
    rng = np.random.default_rng(seed)
    reps = []
    At, Bt = counts_a_RV.T.tocsr(), counts_b_RV.T.tocsr()
    for c0 in range(0, n_boot, chunk):
        b = min(chunk, n_boot - c0)
        W_RB = rng.multinomial(R, np.full(R, 1.0 / R), size=b).T.astype(np.float64) if R else np.zeros((0, b))
        reps.append(js_divergence((At @ W_RB).T, (Bt @ W_RB).T))
    boot = np.concatenate(reps) if reps else np.zeros(0)
    ok = boot[np.isfinite(boot)]
    lo, hi = (np.percentile(ok, [2.5, 97.5]) if len(ok) else (np.nan, np.nan))
    return {"js": point, "ci_low": float(lo), "ci_high": float(hi),
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


@dataclass(frozen=True)
class VocabResult:
    """Per-phase teacher top-token statistics (phases with no tokens are left out)."""

    phases: tuple[str, ...]
    token_ids: np.ndarray  # V' used token ids (columns of counts)
    names: tuple[str, ...]  # visible name of each used token
    counts: np.ndarray  # phases x V' top-id counts
    z: np.ndarray  # phases x V' log-odds z of the phase vs the other phases
    positions: dict[str, int]  # token positions per phase
    rollouts: dict[str, int]  # rollouts with at least one token of the phase
    reasoning_share: dict[str, float]
    entropy_lb: dict[str, float]  # mean teacher entropy lower bound per position (nats)
    js: tuple[dict[str, Any], ...]  # per phase pair: a, b, js, ci_low, ci_high, boot_mean, n_boot
    top_n: int = 5  # teacher top ids counted per position

    def top_tokens(self, phase: str, n: int = 10, by: str = "z") -> list[dict[str, Any]]:
        """The n tokens of a phase with the highest log-odds z (by="z") or count (by="count")."""
        i = self.phases.index(phase)
        key = self.z[i] if by == "z" else self.counts[i].astype(np.float64)
        order = np.lexsort((-self.counts[i], -key))
        order = [j for j in order if self.counts[i, j] > 0][:n]
        return [{"token_id": int(self.token_ids[j]), "token": self.names[j], "count": int(self.counts[i, j]),
                 "z": float(self.z[i, j])} for j in order]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        return {"phases": list(self.phases), "positions": self.positions, "rollouts": self.rollouts,
                "top_ids_counted": int(self.counts.sum()), "reasoning_share": self.reasoning_share,
                "teacher_entropy_lower_bound": self.entropy_lb, "js": [dict(j) for j in self.js],
                "top_log_odds": {p: self.top_tokens(p, top) for p in self.phases},
                "top_counts": {p: self.top_tokens(p, top, by="count") for p in self.phases}}


def compute_vocab(counts_RV: Mapping[str, sp.csr_matrix], names: Sequence[str], token_ids: np.ndarray,
                  entropy_sum: Mapping[str, float], positions: Mapping[str, int],
                  lexicon: Iterable[str] = DEFAULT_LEXICON, n_boot: int = 1000, prior_scale: float = 1.0,
                  seed: int = 0, top_n: int = 5) -> VocabResult:
    """Vocabulary statistics from per-rollout top-id counts.

    counts_RV: phase -> (rollouts x V') sparse counts, rows aligned across phases (same rollouts);
    names / token_ids: the V' columns. entropy_sum / positions: per phase, the sum of per-position
    entropy lower bounds and the number of positions.
    """
    phases = tuple(p for p in PHASE_NAMES if p in counts_RV and positions.get(p, 0) > 0)
    C = np.stack([np.asarray(counts_RV[p].sum(0)).ravel() for p in phases]) if phases else np.zeros((0, len(names)))
    pooled = C.sum(0)
    z = np.zeros_like(C, dtype=np.float64)
    for i in range(len(phases)):
        z[i] = log_odds_z(C[i], pooled - C[i], prior_scale * pooled)
    reason = reasoning_mask([n.replace("·", " ") for n in names], lexicon)
    share = {p: float(C[i, reason].sum() / C[i].sum()) if C[i].sum() else float("nan") for i, p in enumerate(phases)}
    js = []
    for a in range(len(phases)):
        for b in range(a + 1, len(phases)):
            res = bootstrap_js(counts_RV[phases[a]], counts_RV[phases[b]], n_boot=n_boot, seed=seed + 17 * a + b)
            js.append({"a": phases[a], "b": phases[b], **res})
    rollouts = {p: int((counts_RV[p].getnnz(axis=1) > 0).sum()) for p in phases}
    return VocabResult(
        phases=phases, token_ids=np.asarray(token_ids), names=tuple(names), counts=C.astype(np.int64), z=z,
        positions={p: int(positions[p]) for p in phases}, rollouts=rollouts, reasoning_share=share,
        entropy_lb={p: float(entropy_sum[p] / positions[p]) for p in phases}, js=tuple(js), top_n=top_n)


# ------------------------------------------------------------------------------------------------
# Plot (reads only the result)

PHASE_COLORS = {"pre": "#1f77b4", "agreement": "#ff7f0e", "post": "#d62728"}


def plot_vocab(result: VocabResult, fig=None, top: int = 10):
    """Three rows: word clouds of the teacher's top tokens per phase; tokens with the highest
    log-odds z per phase; JS divergence between phases (95 % bootstrap CI), reasoning-token share
    and teacher entropy lower bound per phase."""
    import matplotlib.pyplot as plt
    from wordcloud import WordCloud

    if fig is None:
        fig = plt.figure(figsize=(15, 12))
    phases = result.phases
    ncol = 3
    gs = fig.add_gridspec(3, ncol, height_ratios=[1.1, 1.0, 0.9])
    for i in range(ncol):
        ax = fig.add_subplot(gs[0, i])
        ax.axis("off")
        if i >= len(phases):
            ax.set_title("(no tokens in this phase)")
            continue
        ph = phases[i]
        freq: dict[str, float] = {}
        for name, c in zip(result.names, result.counts[i], strict=True):
            if c > 0:
                freq[name] = freq.get(name, 0.0) + float(c)
        if not freq:  # e.g. a store recorded without teacher top-n ids: nothing to draw
            ax.set_title(f"{ph}: no teacher top-n tokens stored", color=PHASE_COLORS.get(ph))
            continue
        wc = WordCloud(width=600, height=400, background_color="white", random_state=0, prefer_horizontal=1.0,
                       min_font_size=8, max_words=100, collocations=False).generate_from_frequencies(freq)
        ax.imshow(wc.to_array(), interpolation="bilinear")
        ax.set_title(f"{ph}: teacher top-{result.top_n} tokens\n({result.positions[ph]} positions, "
                     f"{result.rollouts[ph]} rollouts)", color=PHASE_COLORS.get(ph))
    for i in range(ncol):
        ax = fig.add_subplot(gs[1, i])
        if i >= len(phases):
            ax.axis("off")
            continue
        ph = phases[i]
        rows = result.top_tokens(ph, top)[::-1]
        ax.barh([r["token"] for r in rows], [r["z"] for r in rows], color=PHASE_COLORS.get(ph))
        ax.axvline(1.96, color="k", ls=":", lw=1)
        ax.set_xlabel("log-odds z vs the other phases (Dirichlet prior)")
        ax.set_title(f"{ph}: most over-represented tokens")
        ax.grid(True, axis="x", alpha=0.3)
    ax = fig.add_subplot(gs[2, 0])
    labels = [f"{j['a']} vs {j['b']}" for j in result.js]
    vals = np.array([j["js"] for j in result.js])
    err = np.array([[j["js"] - j["ci_low"] for j in result.js], [j["ci_high"] - j["js"] for j in result.js]])
    ax.bar(labels, vals, yerr=np.clip(np.nan_to_num(err), 0, None) if len(vals) else None, capsize=6,
           color="#777777")
    for x, j in enumerate(result.js):
        ax.annotate(f"{j['js']:.3g}\n[{j['ci_low']:.3g}, {j['ci_high']:.3g}]", (x, j["ci_high"]), ha="center",
                    va="bottom", fontsize=8)
    top_val = max([j["ci_high"] for j in result.js if np.isfinite(j["ci_high"])] or [np.log(2)])
    ax.set_ylim(0, max(top_val, 1e-4) * 1.35)  # the ceiling is ln 2 = 0.693 (disjoint supports)
    ax.set_ylabel("Jensen-Shannon divergence (nats, max ln 2)")
    ax.set_title("JS between phases, 95 % bootstrap CI (rollouts)")
    ax = fig.add_subplot(gs[2, 1])
    ax.bar(phases, [result.reasoning_share[p] for p in phases], color=[PHASE_COLORS.get(p) for p in phases])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of top ids in the reasoning lexicon")
    ax.set_title("reasoning-token share")
    ax = fig.add_subplot(gs[2, 2])
    ax.bar(phases, [result.entropy_lb[p] for p in phases], color=[PHASE_COLORS.get(p) for p in phases])
    ax.set_ylabel("nats per position (lower bound)")
    ax.set_title("teacher entropy (top-n + tail bucket)")
    fig.suptitle("Teacher vocabulary per phase")
    fig.tight_layout()
    return fig


def write_csv(result: VocabResult, path: str | Path) -> None:
    """One row per (phase, token) with a non-zero count: phase, token_id, token, count, share, z."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "token_id", "token", "count", "share", "z_log_odds"])
        for i, ph in enumerate(result.phases):
            total = max(int(result.counts[i].sum()), 1)
            for j in np.argsort(-result.counts[i], kind="stable"):
                c = int(result.counts[i, j])
                if c == 0:
                    break
                w.writerow([ph, int(result.token_ids[j]), result.names[j], c, c / total, float(result.z[i, j])])


# ------------------------------------------------------------------------------------------------
# Reading a run


def accumulate_store(reader, tau_fixed: float | None, cfg, top: int, weight: str = "count",
                     steps: tuple[int | None, int | None] | None = None, collect_text: bool = False
                     ) -> dict[str, Any]:
    """One lazy pass over the store: per phase, per-rollout counts of the teacher's top-`top` ids
    (sparse), entropy sums and positions; with collect_text, an id -> text map from the stored
    token_text of the sampled tokens (names for runs without a tokenizer at hand)."""
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
            ids = ids_NK[sel]
            ok = ids >= 0
            rows[i].append(np.broadcast_to(rollout_N[sel][:, None], ids.shape)[ok])
            toks[i].append(ids[ok].astype(np.int64))
            wts[i].append(np.ones(int(ok.sum())) if weight == "count" else np.nan_to_num(probs_NK[sel][ok]))
        if collect_text:
            ids, first = np.unique(b["token_ids"].values, return_index=True)
            texts = b["token_text"].values
            for t, j in zip(ids.tolist(), first.tolist(), strict=True):
                if t not in text_of and j < len(texts) and isinstance(texts[j], str):
                    text_of[t] = texts[j]
        base += b.num_rows
    return {"rows": rows, "toks": toks, "wts": wts, "entropy": ent, "positions": pos, "rollouts": base,
            "defined": defined, "text_of": text_of}


def _decode_names(ids: np.ndarray, tokenizer, text_of: Mapping[int, str] | None = None) -> list[str]:
    """Visible names: the tokenizer's decoding, else the stored token_text, else <id>."""
    if tokenizer is not None:
        return [visible_token(tokenizer.decode([int(i)])) for i in ids]
    text_of = text_of or {}
    return [visible_token(text_of[int(i)]) if int(i) in text_of else f"<{int(i)}>" for i in ids]


def run_vocab(run_dir: str | Path, out_dir: str | Path, *, traces: str | Path | None = None,
              tau: str | float | None = "recorded", tokenizer: str | Path | None = None,
              lexicon: str | Path | None = None, top: int = 5, weight: str = "count", n_boot: int = 1000,
              prior_scale: float = 1.0, steps: tuple[int | None, int | None] | None = None,
              kat: Mapping[str, Any] | None = None, seed: int = 0, name: str = "vocab") -> dict[str, Any]:
    """Teacher vocabulary per phase of a run: writes OUT/NAME.png, NAME.csv (phase x token counts and
    z-scores) and NAME.json (the returned summary). tokenizer: default the run's student tokenizer
    (config.json), else ids are shown as <id>. lexicon: a word-list file (one entry per line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kat_diag.analysis.phase_sample import kat_config_of, parse_tau, resolve_tau, run_config
    from kat_diag.traces.reader import TraceReader

    if weight not in ("count", "prob"):
        raise ValueError(f"--weight must be count or prob, got {weight!r}")
    if top < 1 or n_boot < 1 or prior_scale <= 0:
        raise ValueError("--top and --boot must be >= 1 and --prior-scale > 0")
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
    # Bootstrap over the rollouts that have phases (those with an undefined tau carry no tokens).
    if counts:
        has = np.zeros(R, dtype=bool)
        for m in counts.values():
            has |= m.getnnz(axis=1) > 0
        counts = {ph: m[has] for ph, m in counts.items()}
    tok = None
    if tok_path:
        from kat_diag.models import load_tokenizer

        tok = load_tokenizer(tok_path, what="--tokenizer")
    names = _decode_names(used, tok, acc["text_of"])
    result = compute_vocab(counts, names, used,
                           {p: float(acc["entropy"][i]) for i, p in enumerate(PHASE_NAMES)},
                           {p: int(acc["positions"][i]) for i, p in enumerate(PHASE_NAMES)},
                           lexicon=lex, n_boot=n_boot, prior_scale=prior_scale, seed=seed, top_n=top)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / f"{name}.csv")
    fig = plot_vocab(result)
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
    summary = {"run": str(run), "traces": str(reader.dir), "tau_option": str(tau),
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
