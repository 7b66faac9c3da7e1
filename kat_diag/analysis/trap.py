"""The agreement trap in a trace store: does KAT cut wrong rollouts and spare right ones?

KAT is only worth its savings if the low-KL stretches it cuts are degenerate agreement (a wrong
state the teacher follows) rather than benign agreement (a correct path). Given full, untruncated
rollouts (e.g. `kat-diag record`, policy none), this replays the paper's rule (DESIGN §2) at a
given configuration and reports accuracy, fire rates on right vs wrong rollouts, the share of
tokens it would cut, the longest low-KL span, and — when the store carries the embedded world's
ground truth (`kat_diag.truth`) — whether the onsets fall at or after the first error.

The threshold: tau = the `quantile` of the rollout minima (per rollout, the minimum window mean
over usable windows) in the KAT buffer. A store of one step (no training history) uses its own
rollouts as the buffer; a store of several steps replays the FIFO buffer step by step, each step
using the minima of the steps before it (NaN until `min_fill` values are in: no fire).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kat_diag.detector import KATConfig


@dataclass(frozen=True)
class TrapConfig:
    """The KAT rule replayed (W, T, L0, eta quantile, B, B_min) and the keep mode."""

    window: int = 16
    persistence: int = 4
    min_length: int = 32
    quantile: float = 0.7  # tau = this quantile of the buffer of rollout minima (paper: 1 - eta)
    buffer_size: int = 4096
    min_fill: int = 1
    keep: str = "onset"

    def kat(self) -> KATConfig:
        from kat_diag.detector import KATConfig

        # The detector's own quantile is unused here: tau is computed below and passed to replay.
        return KATConfig(window=self.window, persistence=self.persistence, min_length=self.min_length,
                         warmup_steps=0, buffer_size=max(1, self.buffer_size), keep=self.keep)


def rollout_minima(kl_values: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Per rollout the minimum window mean over usable windows (all W values finite); NaN if none."""
    from kat_diag.replay import check_ragged

    values, offs = check_ragged(kl_values, offsets)
    x = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(x)
    c = np.concatenate([[0.0], np.cumsum(np.where(bad, 0.0, x))])
    cb = np.concatenate([[0], np.cumsum(bad)])
    n = x.shape[0]
    end = np.arange(n)  # window ending at flat index `end`
    start = end - window + 1
    roll = np.searchsorted(offs, end, side="right") - 1
    ok = (start >= offs[np.clip(roll, 0, len(offs) - 1)]) & (start >= 0)
    s0 = np.clip(start, 0, None)
    mean = np.where(ok & (cb[end + 1] - cb[s0] == 0), (c[end + 1] - c[s0]) / window, np.inf)
    n_roll = len(offs) - 1
    out = np.full(n_roll, np.inf)
    if n:
        np.minimum.at(out, roll[roll < n_roll], mean[roll < n_roll])
    return np.where(np.isfinite(out), out, np.nan)


def step_taus(minima: np.ndarray, steps: np.ndarray, cfg: TrapConfig) -> np.ndarray:
    """Per rollout tau. One step: the quantile of all minima. Several steps: a FIFO buffer of the
    minima of earlier steps (capacity buffer_size), NaN while it holds fewer than min_fill."""
    uniq = np.unique(steps)
    tau = np.full(len(minima), np.nan)
    if len(uniq) <= 1:
        fin = minima[np.isfinite(minima)]
        if len(fin) >= cfg.min_fill and len(fin):
            tau[:] = float(np.quantile(fin, cfg.quantile))
        return tau
    buf = np.empty(0)
    for s in uniq:
        sel = steps == s
        if len(buf) >= cfg.min_fill and len(buf):
            tau[sel] = float(np.quantile(buf, cfg.quantile))
        new = minima[sel]
        buf = np.concatenate([buf, new[np.isfinite(new)]])[-cfg.buffer_size:]
    return tau


def _longest_true_run(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per rollout the longest run of True in the ragged flags."""
    n_roll = len(offsets) - 1
    out = np.zeros(n_roll, dtype=np.int64)
    if not flags.size:
        return out
    f = flags.astype(np.int64)
    # run length ending at each position, reset at False and at rollout starts
    idx = np.arange(len(f))
    reset = np.zeros(len(f), dtype=bool)
    reset[offsets[:-1][offsets[:-1] < len(f)]] = True
    last_break = np.where((f == 0) | reset, idx - (f == 1), -1)
    last_break = np.maximum.accumulate(last_break)
    run = np.where(f == 1, idx - last_break, 0)
    roll = np.searchsorted(offsets, idx, side="right") - 1
    np.maximum.at(out, roll, run)
    return out


def _share(num: np.ndarray, sel: np.ndarray) -> float:
    return float(num[sel].mean()) if sel.any() else float("nan")


def trap_stats(kl_values: np.ndarray, offsets: np.ndarray, correct: np.ndarray, cfg: TrapConfig,
               steps: np.ndarray | None = None, first_error: np.ndarray | None = None,
               loop_start: np.ndarray | None = None) -> dict[str, float]:
    """The trap report of ragged per-token KL (see the module docstring). first_error / loop_start:
    ground-truth token indices per rollout (-1 none), or None when unknown (real data)."""
    from kat_diag.replay import check_ragged, replay

    values, offs = check_ragged(kl_values, offsets)
    correct = np.asarray(correct, dtype=bool)
    n = len(offs) - 1
    steps = np.zeros(n, dtype=np.int64) if steps is None else np.asarray(steps)
    kat = cfg.kat()
    minima = rollout_minima(values, offs, cfg.window)
    tau = step_taus(minima, steps, cfg)
    res = replay(values, offs, kat, tau, return_low=True)
    fired = res.fire >= 0
    length = res.length
    gen_tokens = max(1, int(length.sum()))
    low_run = _longest_true_run(res.low, offs)
    span = np.where(low_run > 0, low_run + cfg.window - 1, 0)  # tokens covered by the longest low run
    wrong = ~correct
    out: dict[str, float] = {
        "rollouts": float(n),
        "accuracy": float(correct.mean()) if n else float("nan"),
        "mean_length": float(length.mean()) if n else float("nan"),
        "tau": float(np.nanmedian(tau)) if np.isfinite(tau).any() else float("nan"),
        "fire_rate": float(fired.mean()) if n else float("nan"),
        "fire_rate_right": _share(fired, correct),
        "fire_rate_wrong": _share(fired, wrong),
        "cut_share": float((length - res.keep).sum() / gen_tokens),  # tokens not trained on
        "not_generated_share": float(np.where(fired, length - res.fire - 1, 0).sum() / gen_tokens),
        "low_span_right": _share(span.astype(float), correct),
        "low_span_wrong": _share(span.astype(float), wrong),
        "min_mean_right": float(np.nanmean(minima[correct])) if correct.any() else float("nan"),
        "min_mean_wrong": float(np.nanmean(minima[wrong])) if wrong.any() else float("nan"),
    }
    if first_error is not None:
        err = np.asarray(first_error, dtype=np.int64)
        sel = fired & wrong & (err >= 0)
        out["onset_after_error_share"] = _share(res.onset >= err, sel)
        out["right_cut_share"] = _share(fired, correct)
        right_tokens = max(1, int(length[correct].sum()))
        out["right_token_cut_share"] = float((length - res.keep)[correct].sum() / right_tokens)
    if loop_start is not None:
        loop = np.asarray(loop_start, dtype=np.int64) >= 0
        out["loop_share"] = float(loop.mean()) if n else float("nan")
        out["loop_share_of_wrong"] = _share(loop, wrong)
        out["fire_rate_loop"] = _share(fired, loop)
        out["fire_rate_wrong_no_loop"] = _share(fired, wrong & ~loop)
    return out


def trap_report(store, cfg: TrapConfig = TrapConfig()) -> dict[str, float]:
    """`trap_stats` of a trace store (a run directory or store path readable by `TraceReader`)."""
    from kat_diag.traces import UNKNOWN_POSITION, TraceReader

    b = TraceReader(store).read(columns=["kl", "correct", "step", "first_error", "loop_start"])
    err, loop = np.asarray(b["first_error"]), np.asarray(b["loop_start"])
    known = err != UNKNOWN_POSITION
    if not known.any():  # real data (or a schema-1 store): no ground truth
        err = loop = None
    elif not known.all():
        raise ValueError(f"{store}: ground truth is known for only {int(known.sum())} of {len(known)} rollouts")
    graded = np.asarray(b["correct"]) >= 0
    if not graded.all():
        raise ValueError(f"{store}: {int((~graded).sum())} rollouts are not graded (correct is null)")
    kl = b["kl"]
    return trap_stats(np.asarray(kl.values, dtype=np.float64), kl.offsets, np.asarray(b["correct"]) == 1, cfg,
                      steps=np.asarray(b["step"]), first_error=err, loop_start=loop)
