"""Gradient geometry (docs/diagnostics.md, paper §3.2): do a phase's gradients point where training moved?

For every 2-D weight W (m x n) of the student, delta = W_final - W_init and its top-k singular
subspaces U_k (m x k), V_k (n x k) are the directions training actually moved the weight in. For
each phase (pre-agreement, agreement, post-agreement) the OPD loss (full-vocabulary reverse KL, the
trainer's `kat_diag.opd.loss.FullReverseKL`) is differentiated on an equal number N of that phase's
tokens, sampled from stored rollouts: g = (1/N) sum_t grad d_t, one backward per phase sample. Then

    one-sided  rho_k = ||U_k^T g||_F^2 / ||g||_F^2          (isotropic expectation k/m)
    two-sided  ||U_k^T g V_k||_F^2 / ||g||_F^2             (isotropic expectation k^2/(mn))

next to an empirical baseline (the same ratios for random orthonormal U, V of the same k, mean of a
few seeded draws), for a sweep over k, per matrix (type q/k/v/o/gate/up/down/embed/..., layer) and
aggregated as the unweighted mean over the attention and MLP matrices (embeddings are reported per
matrix but left out of the aggregate: their gradient lives on the rows of the tokens seen). The
gradient norm per token of each phase, ||g||_F over all 2-D weights at equal N, is the signal
strength beside the direction.

Which weights are differentiated is a choice (`model`): by default the INIT checkpoint, the model
whose gradients started the update (the paper uses the training-time model; a run keeps only a few
checkpoints, and `final` or any checkpoint path can be chosen instead).

`compute_gradproj` is pure (tensors in, a frozen result out); `phase_gradients` runs the models;
`run_gradproj` reads a run directory, writes gradproj.png / gradproj.csv / gradproj.json.
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


@dataclass(frozen=True)
class PhaseGradient:
    """The mean per-token OPD gradient of one phase's token sample (2-D weights only)."""

    phase: str
    tokens: int
    rollouts: int
    loss_per_token: float  # mean full reverse KL of the sampled tokens
    grads: Mapping[str, torch.Tensor] = field(repr=False)

    @property
    def grad_norm(self) -> float:
        """||g||_F over all 2-D weights of the mean per-token gradient."""
        return math.sqrt(sum(float((g.float() ** 2).sum()) for g in self.grads.values()))


ROW_FIELDS: tuple[str, ...] = ("phase", "matrix", "kind", "layer", "m", "n", "k", "rank", "one_sided",
                               "two_sided", "one_sided_random", "two_sided_random", "one_sided_iso",
                               "two_sided_iso", "grad_energy")


@dataclass(frozen=True)
class GradProjResult:
    """Energy ratios per (phase, matrix, k) as rows (dicts with ROW_FIELDS) and per-phase stats."""

    ks: tuple[int, ...]
    rows: tuple[dict[str, Any], ...]
    phases: tuple[dict[str, Any], ...]  # phase, tokens, rollouts, loss_per_token, grad_norm_per_token
    n_random: int

    def aggregate(self, kinds: Sequence[str] = AGG_KINDS) -> list[dict[str, Any]]:
        """Per (phase, k): unweighted mean over the matrices of `kinds` (where k <= rank) of every ratio."""
        out = []
        for ph in [p["phase"] for p in self.phases]:
            for k in self.ks:
                sel = [r for r in self.rows if r["phase"] == ph and r["k"] == k and r["kind"] in kinds
                       and np.isfinite(r["one_sided"])]
                if not sel:
                    continue
                agg = {"phase": ph, "k": k, "matrices": len(sel)}
                for f in ("one_sided", "two_sided", "one_sided_random", "two_sided_random", "one_sided_iso",
                          "two_sided_iso"):
                    agg[f] = float(np.mean([r[f] for r in sel]))
                out.append(agg)
        return out

    def by_kind(self, k: int) -> list[dict[str, Any]]:
        """Per (phase, kind) at one k: mean over layers of the one- and two-sided ratios and baselines."""
        out = []
        kinds = sorted({r["kind"] for r in self.rows}, key=lambda s: (_kind_order(s), s))
        for ph in [p["phase"] for p in self.phases]:
            for kind in kinds:
                sel = [r for r in self.rows if r["phase"] == ph and r["k"] == k and r["kind"] == kind
                       and np.isfinite(r["one_sided"])]
                if sel:
                    out.append({"phase": ph, "kind": kind, "k": k, "matrices": len(sel),
                                **{f: float(np.mean([r[f] for r in sel])) for f in
                                   ("one_sided", "one_sided_random", "one_sided_iso", "two_sided",
                                    "two_sided_random", "two_sided_iso")}})
        return out

    def by_layer(self, k: int, kinds: Sequence[str] = AGG_KINDS) -> list[dict[str, Any]]:
        """Per (phase, layer) at one k: mean over that layer's attention and MLP matrices."""
        out = []
        layers = sorted({r["layer"] for r in self.rows if r["kind"] in kinds})
        for ph in [p["phase"] for p in self.phases]:
            for layer in layers:
                sel = [r for r in self.rows if r["phase"] == ph and r["k"] == k and r["layer"] == layer
                       and r["kind"] in kinds and np.isfinite(r["one_sided"])]
                if sel:
                    out.append({"phase": ph, "layer": layer, "k": k, "matrices": len(sel),
                                **{f: float(np.mean([r[f] for r in sel])) for f in
                                   ("one_sided", "one_sided_random", "one_sided_iso", "two_sided",
                                    "two_sided_random", "two_sided_iso")}})
        return out

    def to_dict(self) -> dict[str, Any]:
        kref = reference_k(self.ks)
        return {"ks": list(self.ks), "n_random": self.n_random, "reference_k": kref,
                "aggregation": "unweighted mean over attention and MLP matrices (" + ",".join(AGG_KINDS) + ")",
                "phases": [dict(p) for p in self.phases], "aggregate": self.aggregate(),
                "by_kind": self.by_kind(kref), "by_layer": self.by_layer(kref)}


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
        for k in ks:
            if k > s.U.shape[1]:
                continue
            inside = k <= s.rank
            rows.append({
                "phase": phase, "matrix": name, "kind": s.kind, "layer": s.layer, "m": s.m, "n": s.n, "k": k,
                "rank": s.rank, "one_sided": float(one[k - 1]) if inside else math.nan,
                "two_sided": float(two[k - 1]) if inside else math.nan,
                "one_sided_random": float(one_r[k - 1]), "two_sided_random": float(two_r[k - 1]),
                "one_sided_iso": k / s.m, "two_sided_iso": k * k / (s.m * s.n), "grad_energy": energy,
            })
    return rows


def phase_stats(pg: PhaseGradient) -> dict[str, Any]:
    return {"phase": pg.phase, "tokens": pg.tokens, "rollouts": pg.rollouts, "loss_per_token": pg.loss_per_token,
            "grad_norm_per_token": pg.grad_norm}


def compute_gradproj(deltas: Mapping[str, torch.Tensor], phase_grads: Sequence[PhaseGradient],
                     ks: Sequence[int] = DEFAULT_KS, n_random: int = 4, seed: int = 0,
                     svd: str = "auto") -> GradProjResult:
    """Energy ratios of every phase gradient in every 2-D weight's top-k update subspace.

    deltas: name -> W_final - W_init (2-D). phase_grads: one per phase, grads keyed like deltas
    (names missing from a phase are skipped). See `phase_rows` for k beyond the shape or the rank.
    """
    ks = _check_ks(ks, n_random)
    subspaces = update_subspaces(deltas.items(), max(ks), n_random=n_random, seed=seed, svd=svd)
    rows = [r for pg in phase_grads for r in phase_rows(subspaces, pg.phase, pg.grads, ks)]
    return GradProjResult(ks=ks, rows=tuple(rows), phases=tuple(phase_stats(pg) for pg in phase_grads),
                          n_random=n_random)


# ------------------------------------------------------------------------------------------------
# Plot (reads only the result)

PHASE_COLORS = {"pre": "#1f77b4", "agreement": "#ff7f0e", "post": "#d62728"}


def plot_gradproj(result: GradProjResult, fig=None):
    """Four panels: aggregated one-sided and two-sided ratio vs k (with isotropic expectation and
    random-subspace baseline), one-sided ratio per matrix type at the reference k, gradient norm
    per token per phase."""
    import matplotlib.pyplot as plt

    if fig is None:
        fig = plt.figure(figsize=(13, 9))
    axes = fig.subplots(2, 2)
    agg = result.aggregate()
    for ax, key, title in ((axes[0, 0], "one_sided", r"one-sided $\|U_k^T g\|^2/\|g\|^2$"),
                           (axes[0, 1], "two_sided", r"two-sided $\|U_k^T g V_k\|^2/\|g\|^2$")):
        base_drawn = False
        for ph in [p["phase"] for p in result.phases]:
            rows = [a for a in agg if a["phase"] == ph]
            if not rows:
                continue
            ks = [a["k"] for a in rows]
            ax.plot(ks, [a[key] for a in rows], "o-", color=PHASE_COLORS.get(ph), label=f"{ph} (update subspace)")
            ax.plot(ks, [a[key + "_random"] for a in rows], "x:", color=PHASE_COLORS.get(ph), alpha=0.7,
                    label=f"{ph} (random subspace)")
            if not base_drawn:
                ax.plot(ks, [a[key + "_iso"] for a in rows], "k--", lw=1, label="isotropic expectation")
                base_drawn = True
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k (top singular directions of W_final - W_init)")
        ax.set_ylabel("energy ratio (mean over attn+MLP matrices)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    kref = reference_k(result.ks)
    kinds = result.by_kind(kref)
    ax = axes[1, 0]
    kind_names = list(dict.fromkeys(r["kind"] for r in kinds))
    phases = [p["phase"] for p in result.phases]
    width = 0.8 / max(1, len(phases))
    x = np.arange(len(kind_names))
    for j, ph in enumerate(phases):
        vals = {r["kind"]: r for r in kinds if r["phase"] == ph}
        ax.bar(x + j * width, [vals[kd]["one_sided"] if kd in vals else np.nan for kd in kind_names], width,
               color=PHASE_COLORS.get(ph), label=ph)
        ax.scatter(x + j * width, [vals[kd]["one_sided_random"] if kd in vals else np.nan for kd in kind_names],
                   marker="_", s=120, color="k", zorder=3, label="random subspace" if j == 0 else None)
    ax.set_xticks(x + width * (len(phases) - 1) / 2, kind_names)
    ax.set_ylabel(f"one-sided ratio at k = {kref} (mean over layers)")
    ax.set_xlabel("matrix type")
    ax.set_title(f"per matrix type, k = {kref}")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)

    ax = axes[1, 1]
    norms = [p["grad_norm_per_token"] for p in result.phases]
    ax.bar(phases, norms, color=[PHASE_COLORS.get(p) for p in phases])
    for i, p in enumerate(result.phases):
        ax.annotate(f"N={p['tokens']}\nKL={p['loss_per_token']:.3g}", (i, norms[i]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylim(0, max([v for v in norms if np.isfinite(v)] or [1.0]) * 1.2)  # room for the labels
    ax.set_ylabel(r"$\|g\|_F$ of the mean per-token gradient")
    ax.set_xlabel("phase (equal token counts N)")
    ax.set_title("gradient norm per token")
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Gradient geometry: phase gradients vs the training update's top-k subspace")
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


def phase_gradients(student, teacher, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                    samples: Sequence[TokenSample], micro_batch: int = 8) -> Iterator[PhaseGradient]:
    """The mean per-token full reverse-KL gradient of each phase's token sample.

    sequences: (prompt ids, generated ids) per rollout. Each phase is one backward pass (gradient
    accumulated over micro-batches of rollouts); every selected token of a rollout is scored in the
    same forward. The student is in eval mode (no dropout) so the gradient is deterministic.
    Yields one PhaseGradient at a time, so a caller can reduce it before the next is computed.
    """
    from kat_diag.opd.loss import FullReverseKL, LossInputs

    loss_fn = FullReverseKL()
    device = next(student.parameters()).device
    params = {n: p for n, p in student.named_parameters() if p.ndim == 2}
    student.eval()
    teacher.eval()
    for s in samples:
        student.zero_grad(set_to_none=True)
        n_tok = len(s.pos_N)
        used = np.unique(s.rollout_N)
        loss_sum = 0.0
        for c0 in range(0, len(used), micro_batch):
            chunk = used[c0:c0 + micro_batch]
            sel = np.isin(s.rollout_N, chunk)
            r_N, p_N = s.rollout_N[sel], s.pos_N[sel]
            row_of = {int(r): b for b, r in enumerate(chunk)}
            # A rollout is needed only up to its last selected token.
            seqs = []
            for r in chunk:
                prompt, gen = sequences[int(r)]
                last = int(p_N[r_N == r].max())
                seqs.append(list(prompt) + list(gen[:last + 1]))
            T = max(len(q) for q in seqs)
            ids_BT = torch.zeros(len(seqs), T, dtype=torch.long)
            mask_BT = torch.zeros(len(seqs), T, dtype=torch.long)
            for b, q in enumerate(seqs):
                ids_BT[b, :len(q)] = torch.as_tensor(q)
                mask_BT[b, :len(q)] = 1
            rows = torch.as_tensor([row_of[int(r)] for r in r_N], dtype=torch.long)
            # Logits at prompt_len - 1 + t predict generated token t.
            cols = torch.as_tensor([len(sequences[int(r)][0]) - 1 + int(p) for r, p in zip(r_N, p_N, strict=True)],
                                   dtype=torch.long)
            targets = ids_BT[rows, cols + 1]
            ids_BT, mask_BT, rows, cols = (t.to(device) for t in (ids_BT, mask_BT, rows, cols))
            with torch.no_grad():
                t_logp_NV = torch.log_softmax(_selected_logits(teacher, ids_BT, mask_BT, rows, cols).float(), -1)
            s_logits_NV = _selected_logits(student, ids_BT, mask_BT, rows, cols)
            zeros = torch.zeros(len(r_N), device=device)
            loss = loss_fn(LossInputs(student_logits_NV=s_logits_NV, token_ids_N=targets.to(device),
                                      old_logprob_N=zeros, teacher_logprob_N=zeros, teacher_logprobs_NV=t_logp_NV))
            (loss / max(n_tok, 1)).backward()
            loss_sum += float(loss.detach())
        grads = {n: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float))
                 for n, p in params.items()}
        student.zero_grad(set_to_none=True)
        yield PhaseGradient(phase=s.phase, tokens=n_tok, rollouts=len(used),
                            loss_per_token=loss_sum / max(n_tok, 1), grads=grads)


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


# ------------------------------------------------------------------------------------------------
# Run directory -> files


def _reservoir_rollouts(reader, tau_fixed: float | None, cfg, n_rollouts: int, seed: int,
                        steps: tuple[int | None, int | None] | None):
    """Up to n_rollouts rollouts per phase that contain that phase, uniformly sampled over the store
    (seeded random keys, smallest kept), read lazily batch by batch. Returns (batch, labels)."""
    from kat_diag.analysis.phase_sample import label_tokens, rollout_tau
    from kat_diag.traces.ragged import TraceBatch

    cols = ["rollout_id", "step", "prompt_id", "tau", "kl", "token_ids"]
    rng = np.random.default_rng(seed)
    kept: list[tuple[np.ndarray, TraceBatch]] = [(np.zeros(0), None)] * len(PHASE_NAMES)  # type: ignore[list-item]
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
    parts = [bt for _, bt in kept if bt is not None]
    if not parts:
        return None, None, seen
    union = TraceBatch.concat(parts, cols)
    _, first = np.unique(union["rollout_id"], return_index=True)
    union = union.take(np.sort(first))
    labels = label_tokens(union["kl"].values, union["kl"].offsets, rollout_tau(union["tau"], tau_fixed), cfg)
    return union, labels, seen


def _prompt_lookup(config: dict[str, Any]) -> dict[str, str]:
    from kat_diag.opd.config import TrainConfig
    from kat_diag.opd.trainer import load_prompts

    keys = ("data", "question_field", "answer_field", "answer_format")
    tcfg = TrainConfig(teacher=str(config.get("teacher", "")), student=str(config.get("student", "")),
                       out=str(config.get("out", ".")), bench=tuple(config.get("bench") or ()),
                       **{k: config[k] for k in keys if k in config})
    train, bench = load_prompts(tcfg)
    return {p.id: p.prompt for split in (train, *bench.values()) for p in split}


def resolve_checkpoints(run: Path, config: dict[str, Any], init: str | None, final: str | None) -> tuple[Path, Path]:
    """--init default: the run's starting student (config.json); --final default: RUN/final, else the
    newest RUN/checkpoints/step-*."""
    if init is None:
        if not config.get("student"):
            raise ValueError(f"--init not given and {run} has no config.json naming the student")
        init = config["student"]
    if final is None:
        cands = [run / "final"] + sorted((run / "checkpoints").glob("step-*"), reverse=True)
        found = [c for c in cands if (c / "config.json").exists()]
        if not found:
            raise ValueError(f"--final not given and {run} has no final/ or checkpoints/step-*/")
        final = str(found[0])
    return Path(init), Path(final)


def run_gradproj(run_dir: str | Path, out_dir: str | Path, init: str | Path | None = None,
                 final: str | Path | None = None, *, teacher: str | None = None, model: str = "init",
                 traces: str | Path | None = None, tau: str | float | None = "recorded",
                 ks: Sequence[int] = DEFAULT_KS, rollouts: int = 64, tokens: int = 512, n_random: int = 4,
                 svd: str = "auto", micro_batch: int = 8, steps: tuple[int | None, int | None] | None = None,
                 kat: Mapping[str, Any] | None = None, device: str = "cpu", seed: int = 0,
                 name: str = "gradproj") -> dict[str, Any]:
    """Gradient geometry of a run: writes OUT/NAME.png, NAME.csv (one row per phase x matrix x k)
    and NAME.json (the returned summary). kat: overrides of the run's KAT parameters used for the
    phase segmentation (e.g. {"window": 32})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    if rollouts < 1 or tokens < 1 or micro_batch < 1:
        raise ValueError("--rollouts, --tokens and --micro-batch must be >= 1")
    tau_fixed = parse_tau(tau)
    cfg = kat_config_of(config, **dict(kat or {}))
    reader = TraceReader(traces if traces is not None else run)
    tau_fixed = resolve_tau(tau_fixed, reader, cfg.window, steps)
    batch, labels, usable = _reservoir_rollouts(reader, tau_fixed, cfg, rollouts, seed, steps)
    if batch is None:
        raise ValueError(f"no rollouts with a defined phase in {reader.dir}: every recorded tau is NaN "
                         "(KAT inactive); pass --tau VALUE" if usable == 0 else f"no rollouts in {reader.dir}")
    samples, n_tok = sample_phase_tokens(labels, batch["kl"].offsets, tokens, seed)

    from kat_diag.models import load_tokenizer

    tok = load_tokenizer(config.get("student") or init_p, what="student tokenizer")
    lookup = _prompt_lookup(config)
    missing = [p for p in batch["prompt_id"] if p not in lookup]
    if missing:
        raise ValueError(f"prompt id {missing[0]!r} of the traces is not in the run's data ({config.get('data')})")
    prompt_ids = encode_prompts(tok, [lookup[p] for p in batch["prompt_id"]])
    sequences = [(prompt_ids[i], batch["token_ids"][i].tolist()) for i in range(batch.num_rows)]

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
    rows, stats = [], []
    # One phase's gradients at a time: reduced to rows, then dropped (memory: one gradient copy).
    for pg in phase_gradients(student, teacher_m, sequences, samples, micro_batch=micro_batch):
        rows += phase_rows(subspaces, pg.phase, pg.grads, ks)
        stats.append(phase_stats(pg))
    result = GradProjResult(ks=ks, rows=tuple(rows), phases=tuple(stats), n_random=n_random)

    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / f"{name}.csv")
    fig = plot_gradproj(result)
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    summary = {"run": str(run), "traces": str(reader.dir), "init": str(init_p), "final": str(final_p),
               "model": model, "teacher": str(teacher_p),
               "tau": "recorded" if tau_fixed is None else tau_fixed, "tau_option": str(tau),
               "tokens_per_phase": n_tok, "rollouts_sampled": batch.num_rows,
               "files": {"png": str(out / f"{name}.png"), "csv": str(out / f"{name}.csv"),
                         "json": str(out / f"{name}.json")},
               **result.to_dict()}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
