"""Gradient geometry (docs/diagnostics.md, paper §3.2): do a phase's gradients point where training moved?

For every 2-D weight W (m x n) of the student, delta = W_final - W_init and its top-k singular
subspaces U_k (m x k), V_k (n x k) are the directions training actually moved the weight in. For
each phase (pre-agreement, agreement, post-agreement) the OPD loss is differentiated on an equal
number N of that phase's tokens, g = (1/N) sum_t grad d_t, and

    one-sided  rho_k = ||U_k^T g||_F^2 / ||g||_F^2          (isotropic expectation k/m)
    two-sided  ||U_k^T g V_k||_F^2 / ||g||_F^2             (isotropic expectation k^2/(mn))

next to an empirical baseline (the same ratios for random orthonormal U, V of the same k, mean of a
few seeded draws), for a sweep over k, per matrix (type q/k/v/o/gate/up/down/embed/..., layer) and
aggregated as the unweighted mean over the attention and MLP matrices (embeddings are reported per
matrix but left out of the aggregate: their gradient lives on the rows of the tokens seen). The
gradient norm per token of each phase, ||g||_F over all 2-D weights at equal N, is the signal
strength beside the direction.

Sampling, so that the phases are comparable and the comparison has error bars:
* each phase draws its own rollouts (up to ``rollouts``, uniformly over the rollouts that hold the
  phase) and then N of that phase's tokens from them (N equal for every phase: the smallest pool
  caps it); a phase's tokens never come from another phase's rollouts;
* the gradient is taken per *group* of rollouts (by default one group per rollout) as a sum over
  its drawn tokens, one backward each; a bootstrap resamples the groups with replacement (the
  rollout is the unit of dependence, its token draw rides along) and recomputes every ratio from
  g_b = sum_G w_bG g_G / sum_G w_bG N_G, giving a 95 % percentile interval for every number and
  for the differences between phases (independent samples, replicates paired by index). The
  per-group gradients are kept while a phase is reduced: memory groups x 2-D parameters x 4 bytes.
* the loss is the one the run trained with (config ``loss``: the paper's top-k + tail bucket by
  default; `opd.loss`), or the one given (``loss``), and it is named on the figure.

Which weights are differentiated is a choice (`model`): by default the INIT checkpoint, the model
whose gradients started the update (the paper uses the training-time model; a run keeps only a few
checkpoints, and `final` or any checkpoint path can be chosen instead).

`compute_gradproj` (point estimates) and `bootstrap_matrix` are pure (tensors in, arrays out);
`group_gradients` runs the models; `run_gradproj` reads a run directory and writes gradproj.png /
gradproj.csv / gradproj.json.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kat_diag.kat.phases import PHASE_NAMES

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
EXACT_SVD_MAX = 1 << 24  # m * n up to this: exact torch.linalg.svd ("auto"); above: torch.svd_lowrank
RANK_RTOL = 1e-6  # singular values below this share of the largest do not span the update
AGG_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
_KIND_OF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
            "down_proj": "down", "embed_tokens": "embed", "lm_head": "lm_head"}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def matrix_kind(name: str) -> tuple[str, int]:
    """(type, layer) of a parameter name, e.g. model.layers.3.self_attn.q_proj.weight -> ("q", 3);
    layer -1 outside the transformer blocks, type "other" for unknown names."""
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else -1
    parts = name.split(".")
    for p in reversed(parts):
        if p in _KIND_OF:
            return _KIND_OF[p], layer
    return "other", layer


# ------------------------------------------------------------------------------------------------
# Pure math


def principal_subspace(delta_mn: torch.Tensor, k: int, svd: str = "auto", seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top-k left/right singular vectors (U m x k', V n x k', k' = min(k, m, n)) of delta, and its
    numerical rank. svd: "exact" (torch.linalg.svd), "lowrank" (torch.svd_lowrank, q = k + 10,
    4 power iterations) or "auto" (exact up to EXACT_SVD_MAX entries)."""
    if svd not in ("auto", "exact", "lowrank"):
        raise ValueError(f"svd must be auto|exact|lowrank, got {svd!r}")
    m, n = delta_mn.shape
    k = min(k, m, n)
    d = delta_mn.detach().float()
    if svd == "exact" or (svd == "auto" and m * n <= EXACT_SVD_MAX):
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        V = Vh.mT
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(d, q=min(k + 10, m, n), niter=4)
    top = float(S[0]) if S.numel() else 0.0
    rank = int((S > top * RANK_RTOL).sum()) if top > 0 else 0
    return U[:, :k], V[:, :k], rank


def energy_profile(U_mK: torch.Tensor, g_mn: torch.Tensor, V_nK: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For k = 1..K: one-sided ||U_k^T g||^2 / ||g||^2 and two-sided ||U_k^T g V_k||^2 / ||g||^2
    (U_k, V_k the first k columns). Batched: leading dimensions of U/V (e.g. random draws) and of g
    broadcast; the result has shape (..., K). NaN where g = 0."""
    g = g_mn.float().to(U_mK.device)
    total = (g * g).sum((-2, -1))
    A_Kn = U_mK.float().mT @ g
    one = torch.cumsum((A_Kn * A_Kn).sum(-1), -1)
    B_KK = A_Kn @ V_nK.float()
    two = torch.diagonal(torch.cumsum(torch.cumsum(B_KK * B_KK, -2), -1), dim1=-2, dim2=-1)
    denom = torch.where(total > 0, total, torch.nan).unsqueeze(-1)
    return (one / denom).double().cpu().numpy(), (two / denom).double().cpu().numpy()


def random_orthonormal(rows: int, k: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """draws x rows x k matrices with orthonormal columns, uniformly distributed (QR of Gaussians,
    signs fixed by R's diagonal)."""
    G = torch.randn(draws, rows, k, generator=generator)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


N_BOOT = 200  # bootstrap replicates of the rollout groups
LEVEL = 0.95


@dataclass(frozen=True)
class PhaseGradient:
    """The mean per-token OPD gradient of one phase's token sample (2-D weights only)."""

    phase: str
    tokens: int
    rollouts: int
    loss_per_token: float  # mean loss of the sampled tokens
    grads: Mapping[str, torch.Tensor] = field(repr=False)

    @property
    def grad_norm(self) -> float:
        """||g||_F over all 2-D weights of the mean per-token gradient."""
        return math.sqrt(sum(float((g.float() ** 2).sum()) for g in self.grads.values()))


@dataclass(frozen=True)
class GroupGradients:
    """One phase's token sample split into groups of rollouts: per group the SUM of the per-token
    gradients (name -> [G, m, n]) and its token count; the phase gradient is sum(grads) / sum(counts)."""

    phase: str
    counts: np.ndarray  # [G] tokens per group
    rollouts: int
    loss_sum: float
    grads: Mapping[str, torch.Tensor] = field(repr=False)

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def mean(self) -> PhaseGradient:
        n = max(self.tokens, 1)
        return PhaseGradient(self.phase, self.tokens, self.rollouts, self.loss_sum / n,
                             {k: g.sum(0) / n for k, g in self.grads.items()})


ROW_FIELDS: tuple[str, ...] = ("phase", "matrix", "kind", "layer", "m", "n", "k", "rank", "one_sided",
                               "one_sided_bc", "one_sided_lo", "one_sided_hi", "two_sided", "two_sided_bc",
                               "two_sided_lo", "two_sided_hi",
                               "one_sided_random", "two_sided_random", "one_sided_iso", "two_sided_iso",
                               "grad_energy")
_RATIOS = ("one_sided", "two_sided", "one_sided_random", "two_sided_random", "one_sided_iso", "two_sided_iso")


@dataclass(frozen=True)
class PhaseBoot:
    """Bootstrap replicates of one phase: per matrix (in `matrices` order) and k the ratios, and the
    energy ||g_b||^2 per matrix (for the gradient norm)."""

    matrices: tuple[str, ...]
    one: np.ndarray  # [B, M, K] (K = max k; NaN above the rank)
    two: np.ndarray
    energy: np.ndarray  # [B, M]


def _interval(point: float, reps: np.ndarray | None, level: float = LEVEL,
              bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float, float]:
    """(bias-corrected estimate, lo, hi): the basic bootstrap interval around 2 t - mean(t*).

    A ratio of a noisy mean gradient is biased towards the isotropic value (noise spreads the
    energy over every direction) and its norm upwards; the bootstrap sees the same bias, so the
    percentile interval would sit off the estimate. NaN without replicates."""
    from kat_diag.analysis.stats import basic_interval

    if reps is None:
        return math.nan, math.nan, math.nan
    r = np.asarray(reps, dtype=np.float64)
    if np.isfinite(r).sum() < 2:
        return math.nan, math.nan, math.nan
    b = basic_interval(point, r, level, bounds)
    return b["estimate"], b["lo"], b["hi"]


@dataclass(frozen=True)
class GradProjResult:
    """Energy ratios per (phase, matrix, k) as rows (dicts with ROW_FIELDS), per-phase stats and,
    when computed with a bootstrap, the replicates behind every interval."""

    ks: tuple[int, ...]
    rows: tuple[dict[str, Any], ...]
    phases: tuple[dict[str, Any], ...]  # phase, tokens, rollouts, loss_per_token, grad_norm_per_token (+ CI)
    n_random: int
    boot: Mapping[str, PhaseBoot] = field(default_factory=dict)
    level: float = LEVEL

    def _meta(self) -> dict[str, dict[str, Any]]:
        return {r["matrix"]: r for r in self.rows}

    def _select(self, ph: str, k: int, pred: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["phase"] == ph and r["k"] == k and pred(r) and np.isfinite(r["one_sided"])]

    def _boot_mean(self, ph: str, k: int, names: Sequence[str], key: str) -> np.ndarray | None:
        """Replicates of the unweighted mean over `names` of a ratio at k (None without a bootstrap)."""
        b = self.boot.get(ph)
        if b is None or not names:
            return None
        idx = [b.matrices.index(n) for n in names if n in b.matrices]
        arr = (b.one if key == "one_sided" else b.two)[:, idx, k - 1]
        with np.errstate(invalid="ignore"):
            return np.nanmean(arr, axis=1) if arr.size else None

    def _summarise(self, ph: str, k: int, sel: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        out = {**extra, "phase": ph, "k": k, "matrices": len(sel)}
        for f in _RATIOS:
            out[f] = float(np.mean([r[f] for r in sel]))
        for f in ("one_sided", "two_sided"):
            reps = self._boot_mean(ph, k, [r["matrix"] for r in sel], f)
            out[f + "_bc"], out[f + "_lo"], out[f + "_hi"] = _interval(out[f], reps, self.level)
        return out

    def aggregate(self, kinds: Sequence[str] = AGG_KINDS) -> list[dict[str, Any]]:
        """Per (phase, k): unweighted mean over the matrices of `kinds` (where k <= rank) of every
        ratio, with the bootstrap interval of that mean."""
        out = []
        for ph in [p["phase"] for p in self.phases]:
            for k in self.ks:
                sel = self._select(ph, k, lambda r: r["kind"] in kinds)
                if sel:
                    out.append(self._summarise(ph, k, sel, {}))
        return out

    def by_kind(self, k: int) -> list[dict[str, Any]]:
        """Per (phase, kind) at one k: mean over layers of the ratios and baselines, with intervals."""
        out = []
        kinds = sorted({r["kind"] for r in self.rows}, key=lambda s: (_kind_order(s), s))
        for ph in [p["phase"] for p in self.phases]:
            for kind in kinds:
                sel = self._select(ph, k, lambda r, kind=kind: r["kind"] == kind)
                if sel:
                    out.append(self._summarise(ph, k, sel, {"kind": kind}))
        return out

    def by_layer(self, k: int, kinds: Sequence[str] = AGG_KINDS) -> list[dict[str, Any]]:
        """Per (phase, layer) at one k: mean over that layer's attention and MLP matrices."""
        out = []
        layers = sorted({r["layer"] for r in self.rows if r["kind"] in kinds})
        for ph in [p["phase"] for p in self.phases]:
            for layer in layers:
                sel = self._select(ph, k, lambda r, layer=layer: r["layer"] == layer and r["kind"] in kinds)
                if sel:
                    out.append(self._summarise(ph, k, sel, {"layer": layer}))
        return out

    def differences(self, kinds: Sequence[str] = AGG_KINDS) -> list[dict[str, Any]]:
        """Aggregated ratio of phase a minus phase b, per k, with a 95 % interval (the phases are
        independent samples: replicate b of one minus replicate b of the other)."""
        out = []
        names = [p["phase"] for p in self.phases]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for k in self.ks:
                    sa = self._select(a, k, lambda r: r["kind"] in kinds)
                    sb = self._select(b, k, lambda r: r["kind"] in kinds)
                    if not sa or not sb:
                        continue
                    row = {"a": a, "b": b, "k": k}
                    for f in ("one_sided", "two_sided"):
                        row[f] = float(np.mean([r[f] for r in sa]) - np.mean([r[f] for r in sb]))
                        ra = self._boot_mean(a, k, [r["matrix"] for r in sa], f)
                        rb = self._boot_mean(b, k, [r["matrix"] for r in sb], f)
                        row[f + "_bc"], row[f + "_lo"], row[f + "_hi"] = _interval(
                            row[f], None if ra is None or rb is None else ra - rb, self.level, (-1.0, 1.0))
                    out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        kref = reference_k(self.ks)
        return {"ks": list(self.ks), "n_random": self.n_random, "reference_k": kref,
                "aggregation": "unweighted mean over attention and MLP matrices (" + ",".join(AGG_KINDS) + ")",
                "interval": (f"{self.level:.0%} basic (bias-corrected) bootstrap interval around the bias-corrected "
                             "estimate (*_bc), resampling rollout groups "
                             f"({next(iter(self.boot.values())).one.shape[0]} replicates)") if self.boot else None,
                "phases": [dict(p) for p in self.phases], "aggregate": self.aggregate(),
                "differences": self.differences(), "by_kind": self.by_kind(kref), "by_layer": self.by_layer(kref)}


def _kind_order(kind: str) -> int:
    order = (*AGG_KINDS, "embed", "lm_head", "other")
    return order.index(kind) if kind in order else len(order)


def reference_k(ks: Sequence[int]) -> int:
    """The k shown per matrix type: 8 if swept, else the middle of the sweep."""
    return 8 if 8 in ks else sorted(ks)[len(ks) // 2]


@dataclass(frozen=True)
class Subspace:
    """A weight's top-k update subspace and its random baselines (what every phase is compared with)."""

    name: str
    kind: str
    layer: int
    m: int
    n: int
    rank: int  # numerical rank of delta
    U: torch.Tensor  # m x kmax
    V: torch.Tensor  # n x kmax
    U_rand: torch.Tensor  # draws x m x kmax
    V_rand: torch.Tensor  # draws x n x kmax


def _check_ks(ks: Sequence[int], n_random: int) -> tuple[int, ...]:
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise ValueError(f"k values must be >= 1, got {out}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    return out


def update_subspaces(deltas: Iterable[tuple[str, torch.Tensor]], kmax: int, n_random: int = 4, seed: int = 0,
                     svd: str = "auto") -> dict[str, Subspace]:
    """Top-kmax SVD subspaces (k capped at min(m, n)) of each 2-D delta, with seeded random
    orthonormal baselines. deltas may be a generator, so a large model's deltas never coexist."""
    out = {}
    for i, (name, delta) in enumerate(deltas):
        if delta.ndim != 2:
            continue
        m, n = delta.shape
        k = min(kmax, m, n)
        U, V, rank = principal_subspace(delta, k, svd=svd, seed=seed + i)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        kind, layer = matrix_kind(name)
        dev = delta.device  # baselines drawn on the CPU (reproducible), used where the delta lives
        out[name] = Subspace(name, kind, layer, m, n, rank, U, V, random_orthonormal(m, k, n_random, gen).to(dev),
                             random_orthonormal(n, k, n_random, gen).to(dev))
    return out


def _row(s: Subspace, phase: str, k: int, one: np.ndarray, two: np.ndarray, one_r: np.ndarray, two_r: np.ndarray,
         energy: float, boot: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    inside = k <= s.rank
    nan = math.nan
    bc1 = lo1 = hi1 = bc2 = lo2 = hi2 = nan
    if boot is not None and inside:
        bc1, lo1, hi1 = _interval(float(one[k - 1]), boot[0][:, k - 1])
        bc2, lo2, hi2 = _interval(float(two[k - 1]), boot[1][:, k - 1])
    return {"phase": phase, "matrix": s.name, "kind": s.kind, "layer": s.layer, "m": s.m, "n": s.n, "k": k,
            "rank": s.rank, "one_sided": float(one[k - 1]) if inside else nan, "one_sided_bc": bc1,
            "one_sided_lo": lo1, "one_sided_hi": hi1, "two_sided": float(two[k - 1]) if inside else nan,
            "two_sided_bc": bc2, "two_sided_lo": lo2, "two_sided_hi": hi2,
            "one_sided_random": float(one_r[k - 1]), "two_sided_random": float(two_r[k - 1]),
            "one_sided_iso": k / s.m, "two_sided_iso": k * k / (s.m * s.n), "grad_energy": energy}


def phase_rows(subspaces: Mapping[str, Subspace], phase: str, grads: Mapping[str, torch.Tensor],
               ks: Sequence[int]) -> list[dict[str, Any]]:
    """ROW_FIELDS rows of one phase gradient: every matrix x every k (k <= min(m, n)); k above the
    numerical rank of delta gives NaN (those directions are arbitrary, not the update's)."""
    rows = []
    for name, s in subspaces.items():
        g = grads.get(name)
        if g is None:
            continue
        one, two = energy_profile(s.U, g, s.V)
        one_r, two_r = (x.mean(0) for x in energy_profile(s.U_rand, g, s.V_rand))  # all draws at once
        energy = float((g.float() ** 2).sum())
        rows += [_row(s, phase, k, one, two, one_r, two_r, energy) for k in ks if k <= s.U.shape[1]]
    return rows


def bootstrap_matrix(s: Subspace, grads_Gmn: torch.Tensor, counts_G: np.ndarray, weights_BG: np.ndarray,
                     chunk: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicates of one matrix's ratios: for each row w of weights_BG, g_b = sum_G w_G g_G /
    sum_G w_G N_G and its one- and two-sided profiles ([B, K] each) and energy ||g_b||^2 ([B])."""
    G = grads_Gmn.float()
    W = torch.as_tensor(np.asarray(weights_BG, dtype=np.float32), device=G.device)
    n = torch.as_tensor(np.asarray(counts_G, dtype=np.float32), device=G.device)
    ones, twos, energies = [], [], []
    for b0 in range(0, W.shape[0], chunk):
        w = W[b0:b0 + chunk]
        g_bmn = torch.einsum("bg,gmn->bmn", w, G) / (w @ n).clamp_min(1e-12)[:, None, None]
        one, two = energy_profile(s.U, g_bmn, s.V)
        ones.append(one)
        twos.append(two)
        energies.append((g_bmn * g_bmn).sum((-2, -1)).double().cpu().numpy())
    return np.concatenate(ones), np.concatenate(twos), np.concatenate(energies)


def phase_rows_boot(subspaces: Mapping[str, Subspace], gg: GroupGradients, ks: Sequence[int],
                    weights_BG: np.ndarray) -> tuple[list[dict[str, Any]], PhaseBoot]:
    """Rows of one phase (point estimates from all groups, intervals from the replicates) and its
    replicates."""
    rows: list[dict[str, Any]] = []
    names, ones, twos, energies = [], [], [], []
    kmax = max(ks)
    mean = gg.mean()
    for name, s in subspaces.items():
        g_G = gg.grads.get(name)
        if g_G is None:
            continue
        g = mean.grads[name]
        one, two = energy_profile(s.U, g, s.V)
        one_r, two_r = (x.mean(0) for x in energy_profile(s.U_rand, g, s.V_rand))
        b_one, b_two, b_energy = bootstrap_matrix(s, g_G, gg.counts, weights_BG)
        for arr in (b_one, b_two):  # k above the rank: those directions are not the update's
            arr[:, s.rank:] = np.nan
        rows += [_row(s, gg.phase, k, one, two, one_r, two_r, float((g.float() ** 2).sum()), (b_one, b_two))
                 for k in ks if k <= s.U.shape[1]]
        pad = np.full((b_one.shape[0], kmax), np.nan)
        w = min(kmax, b_one.shape[1])
        p1, p2 = pad.copy(), pad.copy()
        p1[:, :w], p2[:, :w] = b_one[:, :w], b_two[:, :w]
        names.append(name)
        ones.append(p1)
        twos.append(p2)
        energies.append(b_energy)
    boot = PhaseBoot(tuple(names), np.stack(ones, 1), np.stack(twos, 1), np.stack(energies, 1))
    return rows, boot


def phase_stats(pg: PhaseGradient, boot: PhaseBoot | None = None) -> dict[str, Any]:
    out = {"phase": pg.phase, "tokens": pg.tokens, "rollouts": pg.rollouts, "loss_per_token": pg.loss_per_token,
           "grad_norm_per_token": pg.grad_norm}
    if boot is not None:
        bc, lo, hi = _interval(pg.grad_norm, np.sqrt(boot.energy.sum(1)), bounds=(0.0, math.inf))
        out["grad_norm_bc"], out["grad_norm_lo"], out["grad_norm_hi"] = bc, lo, hi
    return out


def compute_gradproj(deltas: Mapping[str, torch.Tensor], phase_grads: Sequence[PhaseGradient | GroupGradients],
                     ks: Sequence[int] = DEFAULT_KS, n_random: int = 4, seed: int = 0,
                     svd: str = "auto", n_boot: int = N_BOOT) -> GradProjResult:
    """Energy ratios of every phase gradient in every 2-D weight's top-k update subspace.

    deltas: name -> W_final - W_init (2-D). phase_grads: one per phase, grads keyed like deltas
    (names missing from a phase are skipped). A `GroupGradients` phase also gets bootstrap
    intervals (n_boot replicates over its groups, seeded per phase). See `phase_rows` for k beyond
    the shape or the rank.
    """
    ks = _check_ks(ks, n_random)
    subspaces = update_subspaces(deltas.items(), max(ks), n_random=n_random, seed=seed, svd=svd)
    rows, stats, boots = [], [], {}
    for i, pg in enumerate(phase_grads):
        if isinstance(pg, GroupGradients):
            weights = group_weights(len(pg.counts), n_boot, seed * 7919 + i)
            r, boot = phase_rows_boot(subspaces, pg, ks, weights)
            rows += r
            boots[pg.phase] = boot
            stats.append(phase_stats(pg.mean(), boot))
        else:
            rows += phase_rows(subspaces, pg.phase, pg.grads, ks)
            stats.append(phase_stats(pg))
    return GradProjResult(ks=ks, rows=tuple(rows), phases=tuple(stats), n_random=n_random, boot=boots)


def group_weights(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_groups] multinomial resampling counts (seeded)."""
    from kat_diag.analysis.stats import multinomial_weights

    return multinomial_weights(n_groups, n_boot, np.random.default_rng(seed))


# ------------------------------------------------------------------------------------------------
# Plot (reads only the result)


def plot_gradproj(result: GradProjResult, fig: Any = None, loss: str = "") -> Any:
    """Four panels: the aggregated one- and two-sided ratio vs k with 95 % bands (isotropic
    expectation and random-subspace baseline beside them); the one-sided ratio per matrix type at
    the reference k as a dot plot with intervals; the gradient norm per token per phase with its
    interval, N and the rollouts behind it."""
    from matplotlib.lines import Line2D

    from kat_diag.analysis import style

    if fig is None:
        fig, axes = style.figure(2, 2, size=(style.TEXT_WIDTH, 5.6))
    else:
        axes = np.array(fig.subplots(2, 2))
    agg = result.aggregate()
    phases = [p["phase"] for p in result.phases]
    stats = {p["phase"]: p for p in result.phases}
    for ax, key, title in ((axes[0, 0], "one_sided", r"one-sided $\|U_k^T g\|^2/\|g\|^2$"),
                           (axes[0, 1], "two_sided", r"two-sided $\|U_k^T g V_k\|^2/\|g\|^2$")):
        base_drawn = False
        for ph in phases:
            rows = [a for a in agg if a["phase"] == ph]
            if not rows:
                continue
            c = style.PHASE_COLORS.get(ph, style.INK)
            ks = np.array([a["k"] for a in rows])
            plug = np.array([a[key] for a in rows])
            bc = np.array([a.get(key + "_bc", np.nan) for a in rows])
            ax.plot(ks, np.where(np.isfinite(bc), bc, plug), "o-", color=c, markersize=3, label=ph)
            if np.isfinite(bc).any():
                ax.plot(ks, plug, "o", color=c, markerfacecolor=style.PAPER, markersize=2.5, linewidth=0)
            lo, hi = np.array([a[key + "_lo"] for a in rows]), np.array([a[key + "_hi"] for a in rows])
            floor = 0.5 * min(a[key + "_iso"] for a in rows)  # a lower bound of 0 reaches the axis floor
            if np.isfinite(lo).any():
                ax.fill_between(ks, np.maximum(lo, floor), hi, color=c, alpha=0.2, linewidth=0)
            ax.plot(ks, [a[key + "_random"] for a in rows], ":", color=c, linewidth=0.9)
            if not base_drawn:
                ax.plot(ks, [a[key + "_iso"] for a in rows], "--", color=style.MARK_COLORS["reference"], linewidth=0.9)
                ax.set_ylim(bottom=floor)
                base_drawn = True
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k (top singular directions of W_final - W_init)")
        ax.set_ylabel("energy ratio (mean over attn+MLP)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=style.PHASE_COLORS.get(ph, style.INK), marker="o", markersize=3,
                      label=f"{ph} (N={stats[ph]['tokens']}, {stats[ph]['rollouts']} rollouts)") for ph in phases]
    handles += [Line2D([], [], color=style.INK, marker="o", markerfacecolor=style.PAPER, markersize=2.5,
                       linestyle="none", label="plug-in (line: bias-corrected)"),
                Line2D([], [], color=style.INK, linestyle=":", label="random subspace (same phase)"),
                Line2D([], [], color=style.MARK_COLORS["reference"], linestyle="--", label="isotropic expectation")]
    axes[0, 0].legend(handles=handles, fontsize=6, loc="lower right")

    kref = reference_k(result.ks)
    kinds = result.by_kind(kref)
    ax = axes[1, 0]
    kind_names = list(dict.fromkeys(r["kind"] for r in kinds))
    y = np.arange(len(kind_names))
    for j, ph in enumerate(phases):
        vals = {r["kind"]: r for r in kinds if r["phase"] == ph}
        c = style.PHASE_COLORS.get(ph, style.INK)
        off = (j - (len(phases) - 1) / 2) * 0.22
        for i, kd in enumerate(kind_names):
            r = vals.get(kd)
            if r is None:
                continue
            if np.isfinite(r["one_sided_lo"]):
                ax.plot([r["one_sided_lo"], r["one_sided_hi"]], [i + off, i + off], color=c, linewidth=1.3)
            est = r["one_sided_bc"] if np.isfinite(r.get("one_sided_bc", np.nan)) else r["one_sided"]
            ax.plot([est], [i + off], "o", color=c, markersize=3.5)
            ax.plot([r["one_sided_random"]], [i + off], "|", color=c, markersize=6)
    ax.set_yticks(y, kind_names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels collide at this width
    ax.set_xlabel(f"one-sided ratio at k = {kref} (| random subspace)")
    ax.set_title(f"per matrix type (mean over layers), k = {kref}")

    ax = axes[1, 1]
    for i, ph in enumerate(phases):
        p = stats[ph]
        c = style.PHASE_COLORS.get(ph, style.INK)
        if np.isfinite(p.get("grad_norm_lo", math.nan)):
            ax.plot([p["grad_norm_lo"], p["grad_norm_hi"]], [i, i], color=c, linewidth=1.6)
            ax.plot([p["grad_norm_bc"]], [i], "o", color=c, markersize=5)
            ax.plot([p["grad_norm_per_token"]], [i], "o", color=c, markerfacecolor=style.PAPER, markersize=3.5)
        else:
            ax.plot([p["grad_norm_per_token"]], [i], "o", color=c, markersize=5)
        ax.text(0.98, i - 0.28, f"N={p['tokens']}, {p['rollouts']} rollouts, loss/token {p['loss_per_token']:.3g}",
                transform=ax.get_yaxis_transform(), ha="right", va="center", fontsize=6, color=style.MUTED)
    ax.set_yticks(np.arange(len(phases)), phases)
    ax.set_ylim(len(phases) - 0.5, -0.6)
    ax.set_xlim(left=0)
    ax.set_xlabel(r"$\|g\|_F$ of the mean per-token gradient (hollow: plug-in)")
    ax.set_title("signal strength (equal N per phase)")
    fig.suptitle("Gradient geometry: phase gradients vs the top-k update subspace\n"
                 + (f"loss: {loss}; " if loss else "") + "bands: 95 % bootstrap CIs over rollouts", fontsize=8.5)
    fig.tight_layout()
    return fig


def write_csv(result: GradProjResult, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
        w.writeheader()
        for r in result.rows:
            w.writerow(r)


# ------------------------------------------------------------------------------------------------
# Models: deltas and phase gradients


def weight_deltas(init_model, final_model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, W_final - W_init) for every 2-D parameter, one at a time (the names must match)."""
    init = dict(init_model.named_parameters())
    for name, p in final_model.named_parameters():
        if p.ndim != 2:
            continue
        if name not in init or init[name].shape != p.shape:
            raise ValueError(f"checkpoints do not match: parameter {name} differs between --init and --final")
        yield name, (p.detach().float() - init[name].detach().float())


@dataclass(frozen=True)
class TokenSample:
    """Tokens to differentiate, for one phase: rollout (index into `sequences`) and generated position."""

    phase: str
    rollout_N: np.ndarray
    pos_N: np.ndarray


def _selected_logits(model, ids_BT: torch.Tensor, mask_BT: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """Logits only at (row, col): the decoder's hidden states there through the output head, so a
    real vocabulary never needs a B x T x V tensor."""
    hidden = model.base_model(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state
    return model.get_output_embeddings()(hidden[rows, cols])


def loss_inputs(s_logits_NV: torch.Tensor, t_logp_NV: torch.Tensor, targets_N: torch.Tensor, topk: int):
    """Every field of `opd.loss.LossInputs` from student logits and teacher log-probs at the same
    positions, so any of the trainer's losses can be differentiated: the sampling-time student is the
    model itself (detached), the top-k ids are its top-k there (k capped at the vocabulary)."""
    from kat_diag.opd.loss import LossInputs

    s_logp_NV = torch.log_softmax(s_logits_NV.detach().float(), -1)
    old_N = s_logp_NV.gather(-1, targets_N[:, None]).squeeze(-1)
    t_tok_N = t_logp_NV.gather(-1, targets_N[:, None]).squeeze(-1)
    ids_NK = topk_NK = tail_N = None
    if topk:
        k = min(topk, s_logp_NV.shape[-1])
        ids_NK = s_logp_NV.topk(k, dim=-1).indices
        topk_NK = t_logp_NV.gather(-1, ids_NK)
        tail_N = (torch.logsumexp(t_logp_NV.scatter(-1, ids_NK, float("-inf")), -1) if k < t_logp_NV.shape[-1]
                  else torch.full_like(old_N, float("-inf")))
    return LossInputs(student_logits_NV=s_logits_NV, token_ids_N=targets_N, old_logprob_N=old_N,
                      teacher_logprob_N=t_tok_N, teacher_logprobs_NV=t_logp_NV, topk_ids_NK=ids_NK,
                      teacher_topk_logprobs_NK=topk_NK, teacher_tail_logprob_N=tail_N)


def _backward_tokens(student, teacher, sequences, r_N: np.ndarray, p_N: np.ndarray, loss_fn, micro_batch: int,
                     scale: float) -> float:
    """Accumulate scale x grad(sum of the per-token losses of the tokens (r_N, p_N)) into .grad;
    returns the loss sum. Every selected token of a rollout is scored in the same forward."""
    device = next(student.parameters()).device
    used = np.unique(r_N)
    loss_sum = 0.0
    for c0 in range(0, len(used), micro_batch):
        chunk = used[c0:c0 + micro_batch]
        sel = np.isin(r_N, chunk)
        rr, pp = r_N[sel], p_N[sel]
        row_of = {int(r): b for b, r in enumerate(chunk)}
        seqs = []  # a rollout is needed only up to its last selected token
        for r in chunk:
            prompt, gen = sequences[int(r)]
            last = int(pp[rr == r].max())
            seqs.append(list(prompt) + list(gen[:last + 1]))
        T = max(len(q) for q in seqs)
        ids_BT = torch.zeros(len(seqs), T, dtype=torch.long)
        mask_BT = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, q in enumerate(seqs):
            ids_BT[b, :len(q)] = torch.as_tensor(q)
            mask_BT[b, :len(q)] = 1
        rows = torch.as_tensor([row_of[int(r)] for r in rr], dtype=torch.long)
        # Logits at prompt_len - 1 + t predict generated token t.
        cols = torch.as_tensor([len(sequences[int(r)][0]) - 1 + int(p) for r, p in zip(rr, pp, strict=True)],
                               dtype=torch.long)
        targets = ids_BT[rows, cols + 1]
        ids_BT, mask_BT, rows, cols, targets = (t.to(device) for t in (ids_BT, mask_BT, rows, cols, targets))
        with torch.no_grad():
            t_logp_NV = torch.log_softmax(_selected_logits(teacher, ids_BT, mask_BT, rows, cols).float(), -1)
        s_logits_NV = _selected_logits(student, ids_BT, mask_BT, rows, cols)
        loss = loss_fn(loss_inputs(s_logits_NV, t_logp_NV, targets, getattr(loss_fn, "k", 0)))
        (loss * scale).backward()
        loss_sum += float(loss.detach())
    return loss_sum


def _make_loss(loss: str | Any | None):
    from kat_diag.opd.loss import FullReverseKL, make_loss

    if loss is None:
        return FullReverseKL()
    if isinstance(loss, str):
        name, _, k = loss.partition(":")
        return make_loss(name, int(k) if k else 64)
    return loss


def phase_gradients(student, teacher, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                    samples: Sequence[TokenSample], micro_batch: int = 8, loss: str | Any | None = None
                    ) -> Iterator[PhaseGradient]:
    """The mean per-token loss gradient of each phase's token sample (loss: an `opd.loss` object or a
    name, "topk:64" style; default the full-vocabulary reverse KL).

    sequences: (prompt ids, generated ids) per rollout. Each phase is one backward pass (gradient
    accumulated over micro-batches of rollouts). The student is in eval mode (no dropout) so the
    gradient is deterministic. Yields one PhaseGradient at a time.
    """
    loss_fn = _make_loss(loss)
    params = {n: p for n, p in student.named_parameters() if p.ndim == 2}
    student.eval()
    teacher.eval()
    for s in samples:
        student.zero_grad(set_to_none=True)
        n_tok = len(s.pos_N)
        loss_sum = _backward_tokens(student, teacher, sequences, s.rollout_N, s.pos_N, loss_fn, micro_batch,
                                    1.0 / max(n_tok, 1))
        grads = {n: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float))
                 for n, p in params.items()}
        student.zero_grad(set_to_none=True)
        yield PhaseGradient(phase=s.phase, tokens=n_tok, rollouts=len(np.unique(s.rollout_N)),
                            loss_per_token=loss_sum / max(n_tok, 1), grads=grads)


def group_gradients(student, teacher, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                    sample: TokenSample, group_of: np.ndarray, micro_batch: int = 8, loss: str | Any | None = None
                    ) -> GroupGradients:
    """Per group of rollouts (group_of[r] = the group of rollout r), the SUM of the per-token loss
    gradients of the sample's tokens in that group: one backward per group, kept on the CPU."""
    loss_fn = _make_loss(loss)
    params = {n: p for n, p in student.named_parameters() if p.ndim == 2}
    student.eval()
    teacher.eval()
    groups = np.unique(group_of[sample.rollout_N])
    out = {n: torch.zeros((len(groups), *p.shape), dtype=torch.float32) for n, p in params.items()}
    counts = np.zeros(len(groups), dtype=np.int64)
    loss_sum = 0.0
    for gi, g in enumerate(groups):
        sel = group_of[sample.rollout_N] == g
        student.zero_grad(set_to_none=True)
        loss_sum += _backward_tokens(student, teacher, sequences, sample.rollout_N[sel], sample.pos_N[sel], loss_fn,
                                     micro_batch, 1.0)
        counts[gi] = int(sel.sum())
        for n, p in params.items():
            if p.grad is not None:
                out[n][gi] = p.grad.detach().float().cpu()
    student.zero_grad(set_to_none=True)
    return GroupGradients(phase=sample.phase, counts=counts, rollouts=len(np.unique(sample.rollout_N)),
                          loss_sum=loss_sum, grads=out)


def sample_phase_tokens(labels_N: np.ndarray, offsets: np.ndarray, max_tokens: int, seed: int = 0
                        ) -> tuple[list[TokenSample], int]:
    """Equal-size token samples per phase from labelled rollouts: N = min(max_tokens, smallest
    non-empty phase pool), drawn without replacement (seeded). Empty phases get no sample."""
    offs = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offs)
    rollout_N = np.repeat(np.arange(len(lengths)), lengths)
    pos_N = np.arange(offs[-1] - offs[0]) - (offs[:-1] - offs[0])[rollout_N]
    pools = {p: np.flatnonzero(labels_N == i) for i, p in enumerate(PHASE_NAMES)}
    sizes = [len(v) for v in pools.values() if len(v)]
    if not sizes:
        return [], 0
    n = min(max_tokens, min(sizes))
    rng = np.random.default_rng(seed)
    out = []
    for p, pool in pools.items():
        if len(pool):
            pick = np.sort(rng.choice(pool, size=n, replace=False))
            out.append(TokenSample(p, rollout_N[pick], pos_N[pick]))
    return out, n


def sample_own_phase_tokens(per_phase: Mapping[str, tuple[np.ndarray, np.ndarray]], max_tokens: int, seed: int = 0
                            ) -> tuple[list[TokenSample], int]:
    """Equal-size token samples, each phase from its OWN rollouts: per_phase[p] = (labels, offsets)
    of the rollouts drawn for phase p; N = min(max_tokens, smallest pool of a phase's own tokens).
    The samples' rollout indices refer to each phase's own batch."""
    pools = {}
    for i, p in enumerate(PHASE_NAMES):
        if p in per_phase:
            labels, offs = per_phase[p]
            pools[p] = (np.flatnonzero(np.asarray(labels) == i), np.asarray(offs, dtype=np.int64))
    sizes = [len(v[0]) for v in pools.values() if len(v[0])]
    if not sizes:
        return [], 0
    n = min(max_tokens, min(sizes))
    rng = np.random.default_rng(seed)
    out = []
    for p, (pool, offs) in pools.items():
        if not len(pool):
            continue
        pick = np.sort(rng.choice(pool, size=n, replace=False))
        rollout = np.searchsorted(offs, pick, side="right") - 1
        out.append(TokenSample(p, rollout, pick - offs[rollout]))
    return out, n


def assign_groups(n_rollouts: int, groups: int, seed: int = 0) -> np.ndarray:
    """Group of each rollout: one per rollout when groups >= n_rollouts, else a seeded random
    partition into `groups` near-equal groups."""
    if groups >= n_rollouts:
        return np.arange(n_rollouts)
    perm = np.random.default_rng(seed).permutation(n_rollouts)
    out = np.empty(n_rollouts, dtype=np.int64)
    out[perm] = np.arange(n_rollouts) % groups
    return out


# ------------------------------------------------------------------------------------------------
# Run directory -> files


def _reservoir_rollouts(reader, tau_fixed: float | None, cfg, n_rollouts: int, seed: int,
                        steps: tuple[int | None, int | None] | None):
    """Per phase, up to n_rollouts rollouts that contain that phase, uniformly sampled over the store
    (seeded random keys, smallest kept), read lazily batch by batch. Returns ({phase: (batch,
    labels)}, rollouts with a defined tau)."""
    from kat_diag.analysis.phase_sample import label_tokens, rollout_tau
    from kat_diag.traces.ragged import TraceBatch

    cols = ["rollout_id", "step", "prompt_id", "tau", "kl", "token_ids"]
    rng = np.random.default_rng(seed)
    kept: list[tuple[np.ndarray, Any]] = [(np.zeros(0), None)] * len(PHASE_NAMES)
    seen = 0
    for b in reader.iter_batches(cols, steps=steps):
        tau_R = rollout_tau(b["tau"], tau_fixed)
        labels = label_tokens(b["kl"].values, b["kl"].offsets, tau_R, cfg)
        keys = rng.random(b.num_rows)
        seen += int(np.isfinite(tau_R).sum())
        rollout_N = np.repeat(np.arange(b.num_rows), b["kl"].lengths)
        for i in range(len(PHASE_NAMES)):
            has = np.zeros(b.num_rows, dtype=bool)
            has[rollout_N[labels == i]] = True
            idx = np.flatnonzero(has)
            if not len(idx):
                continue
            old_keys, old = kept[i]
            new = b.take(idx)
            merged = new if old is None else TraceBatch.concat([old, new], cols)
            all_keys = np.concatenate([old_keys, keys[idx]])
            top = np.argsort(all_keys, kind="stable")[:n_rollouts]
            kept[i] = (all_keys[top], merged.take(top))
    out = {}
    for i, ph in enumerate(PHASE_NAMES):
        bt = kept[i][1]
        if bt is not None:
            out[ph] = (bt, label_tokens(bt["kl"].values, bt["kl"].offsets, rollout_tau(bt["tau"], tau_fixed), cfg))
    return out, seen


def _prompt_lookup(config: dict[str, Any]) -> dict[str, str]:
    from kat_diag.opd.config import TrainConfig
    from kat_diag.opd.trainer import load_prompts

    keys = ("data", "question_field", "answer_field", "answer_format")
    tcfg = TrainConfig(teacher=str(config.get("teacher", "")), student=str(config.get("student", "")),
                       out=str(config.get("out", ".")), bench=tuple(config.get("bench") or ()),
                       **{k: config[k] for k in keys if k in config})
    train, bench = load_prompts(tcfg)
    return {p.id: p.prompt for split in (train, *bench.values()) for p in split}


def _is_model_dir(path: Path) -> bool:
    """A directory holding a Hugging Face model (its config.json names a model_type)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def trained_checkpoints(run: Path) -> list[Path]:
    """Checkpoints of the trained student, preferred first: RUN/final (kat-diag train), RUN itself when
    a Hugging Face trainer saved the model there (TRL's `trainer.save_model()`), the newest
    RUN/checkpoints/step-* (kat-diag train), the newest RUN/checkpoint-N (TRL / transformers)."""
    steps = sorted((run / "checkpoints").glob("step-*"), reverse=True)
    numbered = sorted((p for p in run.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                      key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)
    return [c for c in [run / "final", run, *steps, *numbered] if _is_model_dir(c)]


def resolve_checkpoints(run: Path, config: dict[str, Any], init: str | None, final: str | None) -> tuple[Path, Path]:
    """--init default: the run's starting student (config.json); --final default: `trained_checkpoints`'s
    first."""
    if init is None:
        if not config.get("student"):
            raise ValueError(f"--init not given and {run} has no run config naming the student "
                             "(config.json, or the trace manifest's config)")
        init = config["student"]
    if final is None:
        found = trained_checkpoints(run)
        if not found:
            raise ValueError(f"--final not given and {run} has no final/, checkpoints/step-*/ or checkpoint-N/ "
                             "(TRL: save_steps or trainer.save_model())")
        final = str(found[0])
    return Path(init), Path(final)


def run_gradproj(run_dir: str | Path, out_dir: str | Path, init: str | Path | None = None,
                 final: str | Path | None = None, *, teacher: str | None = None, model: str = "init",
                 traces: str | Path | None = None, tau: str | float | None = "recorded",
                 ks: Sequence[int] = DEFAULT_KS, rollouts: int = 64, tokens: int = 512, n_random: int = 4,
                 svd: str = "auto", micro_batch: int = 8, steps: tuple[int | None, int | None] | None = None,
                 kat: Mapping[str, Any] | None = None, device: str = "cpu", seed: int = 0,
                 name: str = "gradproj", loss: str = "run", groups: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Gradient geometry of a run: writes OUT/NAME.png, NAME.csv (one row per phase x matrix x k,
    with intervals) and NAME.json (the returned summary). kat: overrides of the run's KAT parameters
    used for the phase segmentation (e.g. {"window": 32}). loss: "run" (the run config's loss),
    full, topk[:K] or sampled. groups: rollout groups per phase for the bootstrap (0: one per rollout)."""
    from kat_diag.analysis import style
    from kat_diag.analysis.phase_sample import kat_config_of, parse_tau, resolve_tau, run_config
    from kat_diag.models import check_compatible, load_model
    from kat_diag.opd.rollout import encode_prompts
    from kat_diag.traces.reader import TraceReader

    run = Path(run_dir)
    out = Path(out_dir)
    config = run_config(run)
    init_p, final_p = resolve_checkpoints(run, config, None if init is None else str(init),
                                          None if final is None else str(final))
    teacher_p = teacher or config.get("teacher")
    if not teacher_p:
        raise ValueError(f"--teacher not given and {run} has no config naming the teacher")
    if model not in ("init", "final") and not Path(model).exists():
        raise ValueError(f"--model must be init, final or a checkpoint path, got {model!r}")
    from kat_diag.run.preflight import check_range

    for option, value, lo in (("--rollouts", rollouts, 1), ("--tokens", tokens, 1), ("--micro-batch", micro_batch, 1),
                              ("--groups", groups, 0), ("--boot", n_boot, 2)):
        check_range(option, value, lo=lo)
    loss_name = run_loss(config) if loss == "run" else loss
    loss_fn = _make_loss(loss_name)  # a bad --loss fails here, before any model loads
    tau_fixed = parse_tau(tau)
    cfg = kat_config_of(config, **dict(kat or {}))
    reader = TraceReader(traces if traces is not None else run)
    tau_fixed = resolve_tau(tau_fixed, reader, cfg.window, steps)
    per_phase, usable = _reservoir_rollouts(reader, tau_fixed, cfg, rollouts, seed, steps)
    if not per_phase:
        raise ValueError(f"no rollouts with a defined phase in {reader.dir}: every recorded tau is NaN "
                         "(KAT inactive); pass --tau VALUE" if usable == 0 else f"no rollouts in {reader.dir}")
    samples, n_tok = sample_own_phase_tokens({p: (lab, bt["kl"].offsets) for p, (bt, lab) in per_phase.items()},
                                             tokens, seed)

    from kat_diag.models import load_tokenizer

    tok = load_tokenizer(config.get("student") or init_p, what="student tokenizer")
    lookup = _prompt_lookup(config)
    seqs_of: dict[str, list[tuple[list[int], list[int]]]] = {}
    for ph, (bt, _) in per_phase.items():
        missing = [p for p in bt["prompt_id"] if p not in lookup]
        if missing:
            raise ValueError(f"prompt id {missing[0]!r} of the traces is not in the run's data ({config.get('data')})")
        prompt_ids = encode_prompts(tok, [lookup[p] for p in bt["prompt_id"]])
        seqs_of[ph] = [(prompt_ids[i], bt["token_ids"][i].tolist()) for i in range(bt.num_rows)]

    ks = _check_ks(ks, n_random)
    init_m = load_model(init_p, what="--init", device=device)
    final_m = load_model(final_p, what="--final", device=device)
    subspaces = update_subspaces(weight_deltas(init_m, final_m), max(ks), n_random=n_random, seed=seed, svd=svd)
    if model == "init":
        student = init_m
    elif model == "final":
        student = final_m
    else:
        student = load_model(model, what="--model", device=device)
    del init_m, final_m  # only `student` stays alive
    teacher_m = load_model(teacher_p, what="teacher", device=device).requires_grad_(False)
    check_compatible(teacher_m, student)
    rows, stats, boots = [], [], {}
    # One phase at a time: its group gradients are reduced to rows and replicates, then dropped.
    for i, s in enumerate(samples):
        n_roll = per_phase[s.phase][0].num_rows
        group_of = assign_groups(n_roll, groups or n_roll, seed + i)
        gg = group_gradients(student, teacher_m, seqs_of[s.phase], s, group_of, micro_batch=micro_batch,
                             loss=loss_fn)
        r, boot = phase_rows_boot(subspaces, gg, ks, group_weights(len(gg.counts), n_boot, seed * 7919 + i))
        rows += r
        boots[s.phase] = boot
        stats.append({**phase_stats(gg.mean(), boot), "groups": len(gg.counts)})
        del gg
    result = GradProjResult(ks=ks, rows=tuple(rows), phases=tuple(stats), n_random=n_random, boot=boots)

    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / f"{name}.csv")
    loss_label = loss_label_of(loss_name)
    style.save(plot_gradproj(result, loss=loss_label), out / f"{name}.png")
    from kat_diag.analysis.output import shown_path

    summary = {"run": shown_path(run), "traces": shown_path(reader.dir), "init": shown_path(init_p),
               "final": shown_path(final_p), "model": model if model in ("init", "final") else shown_path(model),
               "teacher": shown_path(teacher_p), "loss": loss_name, "loss_label": loss_label,
               "tau": "recorded" if tau_fixed is None else tau_fixed, "tau_option": str(tau),
               "tokens_per_phase": n_tok, "rollouts_per_phase": {p: bt.num_rows for p, (bt, _) in per_phase.items()},
               "sampling": "each phase: its own rollouts, then N of its tokens; bootstrap over rollout groups",
               "files": {"png": shown_path(out / f"{name}.png"), "csv": shown_path(out / f"{name}.csv"),
                         "json": shown_path(out / f"{name}.json")},
               **result.to_dict()}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def run_loss(config: Mapping[str, Any]) -> str:
    """The loss a run trained with, as `_make_loss` reads it: "topk:K", "full" or "sampled"."""
    name = str(config.get("loss") or "full")
    return f"topk:{int(config.get('topk') or 64)}" if name == "topk" else name


def loss_label_of(loss: str) -> str:
    name, _, k = loss.partition(":")
    return {"topk": f"top-{k or 64} reverse KL + tail (the paper's)", "full": "full-vocabulary reverse KL",
            "sampled": "sampled-token KL"}.get(name, loss)
