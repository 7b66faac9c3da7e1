"""Offline replay of the KAT detector over recorded per-token KL.

Questions like "where would KAT have fired on this OPD run?", "how does onset move with eta?" or
the phase segmentation of DESIGN §3 need the detector's decisions on stored traces, without the
models. `replay` runs the *same* `StreamingDetector` the rollout engine uses, so on the same
tokens and the same tau it returns exactly what the online run decided (including rollouts
that were truncated online at fire: the recorded prefix contains every token the decision
depended on). Input is ragged: one flat array of per-token KL and offsets, as the trace store
keeps it; rollouts are sorted by length and padded into blocks so millions of tokens replay
in a few vectorised calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kat_diag.detector import KATConfig, StreamingDetector, kept_tokens
from kat_diag.trace_view import _fmt, format_table
from kat_diag.traces import Ragged, TraceReader


@dataclass(frozen=True)
class ReplayResult:
    """Per-rollout decisions (int64 arrays of length n_rollouts; -1 = not fired)."""

    onset: np.ndarray
    fire: np.ndarray
    keep: np.ndarray  # tokens kept for training under cfg.keep; the full length if not fired
    length: np.ndarray
    # Per token (aligned with kl_values), only with return_low=True: the window ending at this
    # token exists, is usable and has mean < tau. False outside rollouts.
    low: np.ndarray | None = None

    @property
    def fired(self) -> np.ndarray:
        return self.fire >= 0


def check_ragged(kl_values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the ragged layout: rollout k is kl_values[offsets[k]:offsets[k+1]]."""
    values = np.asarray(kl_values)
    offs = np.asarray(offsets)
    if values.ndim != 1:
        raise ValueError(f"kl_values must be 1-D (concatenated tokens), got shape {values.shape}")
    if offs.ndim != 1 or offs.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D with n_rollouts + 1 entries, got shape {offs.shape}")
    if not np.issubdtype(offs.dtype, np.integer):
        raise ValueError(f"offsets must be integers, got {offs.dtype}")
    offs = offs.astype(np.int64)
    if offs[0] < 0 or offs[-1] > values.shape[0] or np.any(np.diff(offs) < 0):
        raise ValueError("offsets must be non-decreasing and within [0, len(kl_values)]")
    return values, offs


def replay(kl_values: np.ndarray, offsets: np.ndarray, cfg: KATConfig, tau: float | np.ndarray, *,
           return_low: bool = False, max_block_tokens: int = 1 << 21) -> ReplayResult:
    """Run the KAT detector over ragged recorded KL.

    kl_values: float per-token KL, all rollouts concatenated (float32 or float64: both give the
    same decisions). offsets: int64, length n_rollouts + 1. tau: one threshold or one per rollout
    (NaN = detector inactive for that rollout, e.g. a warm-up step). return_low adds the
    per-token low flags used by `kat_diag.analysis.phases`. max_block_tokens bounds the padded block
    (rows x longest length) processed at once.
    """
    values, offs = check_ragged(kl_values, offsets)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    n_roll = offs.shape[0] - 1
    length = np.diff(offs)
    tau_R = np.broadcast_to(np.asarray(tau, dtype=np.float64), (n_roll,))
    fire = np.full(n_roll, -1, dtype=np.int64)
    low = np.zeros(values.shape[0], dtype=bool) if return_low else None

    order = np.argsort(length, kind="stable")
    start = int(np.searchsorted(length[order], 1))  # zero-length rollouts cannot fire
    probe = StreamingDetector(cfg, backend="numpy")
    col_chunk = max(1, min(probe.max_chunk, max_block_tokens))
    while start < n_roll:
        # Block of rollouts of similar length: rows x longest <= max_block_tokens (at least 1 row).
        rows = max(1, max_block_tokens // int(length[order[start]]))
        end = min(n_roll, start + rows)
        while end - start > 1 and (end - start) * int(length[order[end - 1]]) > max_block_tokens:
            end = start + max(1, max_block_tokens // int(length[order[end - 1]]))
        idx_R = order[start:end]
        _replay_block(values, offs[idx_R], length[idx_R], tau_R[idx_R], cfg, col_chunk, fire, idx_R, low)
        start = end

    onset = np.where(fire >= 0, fire - cfg.fire_lag, -1)
    keep = kept_tokens(fire, length, cfg).astype(np.int64)
    return ReplayResult(onset=onset, fire=fire, keep=keep, length=length, low=low)


def _replay_block(values: np.ndarray, starts_R: np.ndarray, len_R: np.ndarray, tau_R: np.ndarray,
                  cfg: KATConfig, col_chunk: int, fire_out: np.ndarray, idx_R: np.ndarray,
                  low_out: np.ndarray | None) -> None:
    det = StreamingDetector(cfg, len(idx_R), backend="numpy")
    longest = int(len_R.max())
    for c0 in range(0, longest, col_chunk):
        pos_C = np.arange(c0, min(longest, c0 + col_chunk), dtype=np.int64)
        valid_RC = pos_C < len_R[:, None]
        flat_RC = np.where(valid_RC, starts_R[:, None] + pos_C, 0)
        kl_RC = np.where(valid_RC, values[flat_RC], 0.0)
        det.update(kl_RC, valid_RC, tau_B=tau_R)
        if low_out is not None:
            low_RC = det.last_low_BC.numpy() & valid_RC & (pos_C >= cfg.window - 1)
            low_out[flat_RC[valid_RC]] = low_RC[valid_RC]
    fire_out[idx_R] = det.fire_B.numpy()


# ------------------------------------------------------------------------------ a whole store

REPLAY_COLUMNS = ["step", "rollout_id", "policy", "tau", "onset", "fire", "kl"]


def _truncate(r: Ragged, lengths: np.ndarray) -> Ragged:
    """The first ``lengths[i]`` values of each rollout (lengths never exceed the rollouts')."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pos = np.repeat(r.offsets[:-1] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Ragged(offsets, r.values[pos])


def _take(r: Ragged, order: np.ndarray) -> Ragged:
    """Rollouts ``order[0], order[1], ...`` of ``r`` as a new ragged array."""
    lengths = r.lengths[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pos = np.repeat(r.offsets[:-1][order] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Ragged(offsets, r.values[pos])


class _ReplayAcc:
    """Running totals of a replay (one pass, per step or per batch)."""

    def __init__(self, keep_rows: bool) -> None:
        self.rollouts = self.tokens = self.fired = self.onset_sum = self.keep_sum = self.gen_sum = 0
        self.ratio_sum = 0.0
        self.ratio_n = 0
        self.phase_kl = np.zeros(3)
        self.phase_tokens = np.zeros(3, dtype=np.int64)
        self.compared = self.fire_match = self.onset_match = 0
        self.taus: dict[int, float] = {}
        self.keep_rows = keep_rows
        self.rows: list[dict[str, np.ndarray]] = []

    def add(self, b: Any, tau: np.ndarray, cfg: KATConfig) -> np.ndarray:
        """Replay one batch at per-rollout tau; returns the fire positions."""
        from kat_diag.analysis.phases import phase_labels, segment
        from kat_diag.detector import kept_tokens

        kl: Ragged = b["kl"]
        ph = segment(kl.values, kl.offsets, cfg, tau)
        fire, onset, length = ph.fire, ph.onset, ph.length
        keep = np.asarray(kept_tokens(fire, length, cfg), dtype=np.int64)
        fired = fire >= 0
        self.rollouts += len(fire)
        self.tokens += int(length.sum())
        self.fired += int(fired.sum())
        self.onset_sum += int(onset[fired].sum())
        self.keep_sum += int(keep.sum())
        # Tokens KAT would have generated: up to and including the fire token.
        self.gen_sum += int(np.where(fired, fire + 1, length).sum())
        nz = length > 0
        self.ratio_sum += float((keep[nz] / length[nz]).sum())
        self.ratio_n += int(nz.sum())
        labels = phase_labels(kl.offsets, ph.pre_end, ph.agree_end)
        values = np.asarray(kl.values, dtype=np.float64)
        ok = np.isfinite(values)
        self.phase_kl += np.bincount(labels[ok], weights=values[ok], minlength=3)[:3]
        self.phase_tokens += np.bincount(labels[ok], minlength=3)[:3]
        # Agreement with what the run recorded, where a KAT policy decided online.
        kat_rows = np.char.find(b["policy"].astype(str), "kat") >= 0
        self.compared += int(kat_rows.sum())
        self.fire_match += int((fire[kat_rows] == b["fire"][kat_rows]).sum())
        self.onset_match += int((onset[kat_rows] == b["onset"][kat_rows]).sum())
        if self.keep_rows:
            self.rows.append({
                "rollout_id": b["rollout_id"], "step": b["step"], "policy": b["policy"], "tau": tau,
                "onset": onset, "fire": fire, "keep": keep, "length": length, "pre_end": ph.pre_end,
                "agree_end": ph.agree_end, "recorded_onset": b["onset"], "recorded_fire": b["fire"],
            })
        return fire

    def summary(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        from kat_diag.analysis.phases import PHASE_NAMES  # phases imports this module

        taus = [t for t in self.taus.values() if math.isfinite(t)]
        return {
            "rollouts": self.rollouts,
            "tokens": self.tokens,
            "fired_share": ratio(self.fired, self.rollouts),
            "mean_onset": ratio(self.onset_sum, self.fired),
            "kept_tokens": self.keep_sum,
            "kept_ratio": ratio(self.keep_sum, self.tokens),
            "mean_kept_ratio": ratio(self.ratio_sum, self.ratio_n),
            "mean_kept_len": ratio(self.keep_sum, self.rollouts),
            "generated_ratio": ratio(self.gen_sum, self.tokens),
            "phase_mean_kl": {n: ratio(float(self.phase_kl[i]), int(self.phase_tokens[i]))
                              for i, n in enumerate(PHASE_NAMES)},
            "phase_tokens": {n: int(self.phase_tokens[i]) for i, n in enumerate(PHASE_NAMES)},
            "tau": {
                "steps": len(self.taus), "active_steps": len(taus),
                "min": min(taus) if taus else None, "max": max(taus) if taus else None,
                "mean": sum(taus) / len(taus) if taus else None,
            },
            "recorded": {
                "compared": self.compared,
                "fire_match": ratio(self.fire_match, self.compared),
                "onset_match": ratio(self.onset_match, self.compared),
            },
        }

    def per_rollout(self) -> dict[str, np.ndarray]:
        names = ["rollout_id", "step", "policy", "tau", "onset", "fire", "keep", "length", "pre_end",
                 "agree_end", "recorded_onset", "recorded_fire"]
        if not self.rows:
            return {n: np.zeros(0) for n in names}
        return {n: np.concatenate([r[n] for r in self.rows]) for n in names}


def replay_store(
    reader: TraceReader,
    cfg: KATConfig,
    tau: float | str | None = None,
    *,
    per_rollout: bool = False,
    progress: bool = False,
    **filters: Any,
) -> dict[str, Any]:
    """What KAT with ``cfg`` would have done on the recorded traces (e.g. of a plain OPD run).

    ``tau``:

    * ``None`` (adaptive, like KAT online): steps are replayed in increasing order; each step uses
      the threshold in force of an :class:`~kat_diag.detector.AdaptiveThreshold` (inactive before
      step K and while the buffer holds fewer than B_min values); after the step the buffer gets
      what the step's rollouts contribute (`kat_diag.detector.buffer_values` under
      ``cfg.statistic``) from the tokens KAT would have kept in the trace: up to and including
      the fire token, the whole rollout if not fired; in rollout-id order (rank, then position in
      the step), as online. This equals the online threshold whenever every rollout of every step
      was recorded (``trace_every`` 1) and passes the filters; with the run's own configuration it
      reproduces the online decisions exactly, whatever the engine's chunk size;
    * ``"recorded"``: each rollout's recorded threshold in force (NaN = inactive);
    * a float: that fixed threshold for every rollout.

    Returns a JSON-ready summary: fired share, mean onset (fired rollouts), kept ratio (kept /
    generated tokens, overall and mean per rollout), generated ratio (tokens up to fire / recorded
    tokens: the generation KAT saves), per-phase mean KL (token-weighted, finite KL only; phases
    of :mod:`kat_diag.analysis.phases` at the replay tau), tau statistics, and the agreement with the
    recorded onset/fire of rollouts whose recorded policy is a KAT one. With ``per_rollout`` the
    per-rollout arrays are added under ``"rows"`` (not JSON-ready; numpy arrays).
    """
    from kat_diag.detector import AdaptiveThreshold, buffer_values

    acc = _ReplayAcc(per_rollout)

    def steps_bar(it: Any) -> Any:
        if not progress:
            return it
        from kat_diag.progress import bar

        return bar(it, desc="replay", unit="batch")

    if tau is None:
        mode = "adaptive"
        threshold = AdaptiveThreshold(cfg)
        for step, b in steps_bar(reader.iter_steps(REPLAY_COLUMNS, **filters)):
            t = threshold.begin_step(step)
            acc.taus[step] = t
            fire = acc.add(b, np.full(b.num_rows, t), cfg)
            kl: Ragged = b["kl"]
            kept = _truncate(kl, np.where(fire >= 0, fire + 1, kl.lengths))
            order = np.argsort(np.asarray(b["rollout_id"]), kind="stable")
            kept = _take(kept, order)
            threshold.observe(buffer_values(kept.values, kept.offsets, cfg))
    else:
        mode = "recorded" if tau == "recorded" else "fixed"
        fixed = None if mode == "recorded" else float(tau)
        for b in steps_bar(reader.iter_batches(REPLAY_COLUMNS, **filters)):
            t = b["tau"].astype(np.float64) if fixed is None else np.full(b.num_rows, fixed)
            acc.add(b, t, cfg)
            for s, v in zip(b["step"].tolist(), t.tolist(), strict=True):
                acc.taus.setdefault(s, v)
    out = {"store": str(reader.dir), "tau_mode": mode,
           "tau_value": float(tau) if mode == "fixed" else None,
           "kat": cfg.to_dict(), **acc.summary()}
    if per_rollout:
        out["rows"] = acc.per_rollout()
    return out


def format_replay(result: dict[str, Any]) -> str:
    """The replay summary as text."""
    from kat_diag.analysis.phases import PHASE_NAMES
    k = result["kat"]
    head = (f"KAT replay of {result['store']}  tau: {result['tau_mode']}"
            + (f" = {result['tau_value']:g}" if result["tau_value"] is not None else "")
            + f"  W={k['window']} T={k['persistence']} L0={k['min_length']} K={k['warmup_steps']}"
            f" B={k['buffer_size']} B_min={k['min_fill']} statistic={k['statistic']}"
            f" tau_quantile={k['tau_quantile']} keep={k['keep']}")
    rows = [
        ["rollouts", _fmt(result["rollouts"])], ["tokens", _fmt(result["tokens"])],
        ["fired", _fmt(result["fired_share"], "pct")], ["mean onset", _fmt(result["mean_onset"], "len")],
        ["mean kept length", _fmt(result["mean_kept_len"], "len")],
        ["kept / generated tokens", _fmt(result["kept_ratio"], "pct")],
        ["mean kept ratio per rollout", _fmt(result["mean_kept_ratio"], "pct")],
        ["tokens KAT would generate", _fmt(result["generated_ratio"], "pct")],
    ]
    for name in PHASE_NAMES:
        rows.append([f"mean KL {name} ({result['phase_tokens'][name]} tokens)",
                     _fmt(result["phase_mean_kl"][name])])
    t = result["tau"]
    rows.append(["tau (active steps / steps)", f"{t['active_steps']} / {t['steps']}"])
    if t["active_steps"]:
        rows.append(["tau min / mean / max", f"{t['min']:.4g} / {t['mean']:.4g} / {t['max']:.4g}"])
    rec = result["recorded"]
    if rec["compared"]:
        rows.append([f"matches recorded fire ({rec['compared']} KAT rollouts)", _fmt(rec["fire_match"], "pct")])
    return head + "\n\n" + format_table(["", "value"], rows)
