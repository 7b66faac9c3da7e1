"""KAT replayed over a whole trace store, step by step, with its threshold buffer (`kat-diag replay`).

The array-level replay (`kat_diag.kat.replay.replay`) decides onset and fire for ragged KL at given
taus; this module feeds it a store lazily, one step at a time, replays the FIFO threshold buffer the
way training did (or uses the recorded tau), and compares the result with what the run decided
online.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kat_diag.kat.config import KATConfig
from kat_diag.traces.ragged import Ragged
from kat_diag.traces.reader import TraceReader
from kat_diag.views.text import _fmt, format_table

# ------------------------------------------------------------------------------ a whole store

REPLAY_COLUMNS = ["step", "rollout_id", "policy", "tau", "onset", "fire", "kl"]


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
        from kat_diag.kat.detector import kept_tokens
        from kat_diag.kat.phases import phase_labels, segment

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

        from kat_diag.kat.phases import PHASE_NAMES  # phases imports this module

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
                "at_floor_steps": sum(t <= 0 for t in taus),  # active but unable to fire (detector.at_resolution_floor)
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
      the threshold in force of an :class:`~kat_diag.kat.detector.AdaptiveThreshold` (inactive before
      step K and while the buffer holds fewer than B_min values); after the step the buffer gets
      what the step's rollouts contribute (`kat_diag.kat.detector.buffer_values` under
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
    of :mod:`kat_diag.kat.phases` at the replay tau), tau statistics, and the agreement with the
    recorded onset/fire of rollouts whose recorded policy is a KAT one. With ``per_rollout`` the
    per-rollout arrays are added under ``"rows"`` (not JSON-ready; numpy arrays).
    """
    from kat_diag.kat.detector import KATResolutionWarning, at_resolution_floor, floor_message
    from kat_diag.kat.replay import ThresholdReplay

    acc = _ReplayAcc(per_rollout)

    def steps_bar(it: Any) -> Any:
        if not progress:
            return it
        from kat_diag.run.progress import bar

        return bar(it, desc="replay", unit="batch")

    if tau is None:
        mode = "adaptive"
        threshold = ThresholdReplay(cfg)  # the same buffer replay as `kat-diag trap`
        for step, b in steps_bar(reader.iter_steps(REPLAY_COLUMNS, **filters)):
            t = threshold.begin_step(step)
            acc.taus[step] = t
            fire = acc.add(b, np.full(b.num_rows, t), cfg)
            kl: Ragged = b["kl"]
            threshold.end_step(kl.values, kl.offsets, fire, np.asarray(b["rollout_id"]))
    else:
        mode = "recorded" if tau == "recorded" else "fixed"
        fixed = None if mode == "recorded" else float(tau)
        for b in steps_bar(reader.iter_batches(REPLAY_COLUMNS, **filters)):
            t = b["tau"].astype(np.float64) if fixed is None else np.full(b.num_rows, fixed)
            acc.add(b, t, cfg)
            for s, v in zip(b["step"].tolist(), t.tolist(), strict=True):
                acc.taus.setdefault(s, v)
    floor = [t for t in acc.taus.values() if at_resolution_floor(t)]
    if floor and reader.kl_source != "k1":  # k1 can be negative: windows can go below a tau <= 0
        import warnings

        warnings.warn(floor_message(max(floor), f"in {len(floor)} of {len(acc.taus)} steps"),
                      KATResolutionWarning, stacklevel=2)
    out = {"store": str(reader.dir), "tau_mode": mode,
           "tau_value": float(tau) if mode == "fixed" else None,
           "kat": cfg.to_dict(), **acc.summary()}
    if per_rollout:
        out["rows"] = acc.per_rollout()
    return out


def format_replay(result: dict[str, Any]) -> str:
    """The replay summary as text."""
    from kat_diag.kat.phases import PHASE_NAMES
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
