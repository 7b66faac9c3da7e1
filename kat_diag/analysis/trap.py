"""The agreement trap in a trace store: does KAT cut wrong rollouts and spare right ones?

KAT is only worth its savings if the low-KL stretches it cuts are degenerate agreement (a wrong
state the teacher follows) rather than benign agreement (a correct path). Given full, untruncated
rollouts (e.g. `kat-diag record`, policy none), this replays the paper's rule (docs/kat.md) at a
given configuration and reports accuracy, fire rates on right vs wrong rollouts, the share of
tokens it would cut, the longest low-KL span, and — when the store carries the embedded world's
ground truth (`kat_diag.world.truth`) — whether the onsets fall at or after the first error.

The threshold: tau = the `tau_quantile` of the KAT buffer (with the paper's statistic, the rollout
minima: per rollout the minimum window mean over usable windows). A store of one step (no
training history, e.g. one `record`) uses its own rollouts as the buffer; a store of several
steps replays the FIFO buffer step by step exactly as `kat-diag replay` does (one code path,
`kat_diag.kat.replay.ThresholdReplay`): each step uses the values of the steps before it (NaN, no
fire, before step K and until `min_fill` values are in), and a rollout pushes only what KAT would
have kept of it, up to its fire.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kat_diag.kat.config import KATConfig


def step_taus(kl_values: np.ndarray, offsets: np.ndarray, steps: np.ndarray, cfg: KATConfig,
              rollout_ids: np.ndarray | None = None) -> np.ndarray:
    """Per rollout tau. A store of one step: the threshold of all its rollouts' buffer values (no
    history: the store is its own buffer; warm-up K does not apply). Several steps: KAT's FIFO
    buffer replayed as online by `kat_diag.kat.replay.ThresholdReplay`, the code path of
    `kat-diag replay` (each step's tau from the values of the steps before it, NaN before step K
    or below B_min values; a rollout pushes what it kept up to its fire, in rollout-id order)."""
    from kat_diag.kat.detector import buffer_values, threshold_of
    from kat_diag.kat.replay import ThresholdReplay, replay

    steps = np.asarray(steps)
    offs = np.asarray(offsets, dtype=np.int64)
    values = np.asarray(kl_values)
    uniq = np.unique(steps)
    tau = np.full(len(steps), np.nan)
    if len(uniq) <= 1:
        tau[:] = threshold_of(buffer_values(values, offs, cfg), cfg)
        return tau
    ids = np.arange(len(steps)) if rollout_ids is None else np.asarray(rollout_ids)
    threshold = ThresholdReplay(cfg)
    for s in uniq:
        idx = np.flatnonzero(steps == s)
        lengths = offs[idx + 1] - offs[idx]
        sub_off = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=sub_off[1:])
        pos = np.repeat(offs[idx] - sub_off[:-1], lengths) + np.arange(sub_off[-1])
        sub = values[pos]
        t = threshold.begin_step(int(s))
        tau[idx] = t
        threshold.end_step(sub, sub_off, replay(sub, sub_off, cfg, t).fire, ids[idx])
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


def trap_stats(kl_values: np.ndarray, offsets: np.ndarray, correct: np.ndarray, cfg: KATConfig,
               steps: np.ndarray | None = None, first_error: np.ndarray | None = None,
               loop_start: np.ndarray | None = None, rollout_ids: np.ndarray | None = None) -> dict[str, float]:
    """The trap report of ragged per-token KL (see the module docstring). first_error / loop_start:
    ground-truth token indices per rollout (-1 none), or None when unknown (real data). rollout_ids:
    the order in which a step's rollouts feed the buffer (default: the given order)."""
    from kat_diag.kat.detector import rollout_minima
    from kat_diag.kat.replay import check_ragged, replay

    values, offs = check_ragged(kl_values, offsets)
    correct = np.asarray(correct, dtype=bool)
    n = len(offs) - 1
    steps = np.zeros(n, dtype=np.int64) if steps is None else np.asarray(steps)
    minima = rollout_minima(values, offs, cfg.window)
    tau = step_taus(values, offs, steps, cfg, rollout_ids)
    floor = np.isfinite(tau) & (tau <= 0)
    if floor.any() and not (values < 0).any():  # a sampled estimate (k1) can go below a tau <= 0
        import warnings

        from kat_diag.kat.detector import KATResolutionWarning, floor_message

        warnings.warn(floor_message(float(tau[floor].max()), f"on {int(floor.sum())} of {n} rollouts"),
                      KATResolutionWarning, stacklevel=2)
    res = replay(values, offs, cfg, tau, return_low=True)
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


def trap_report(store, cfg: KATConfig, *, allow_foreign: bool = False) -> dict[str, float]:
    """`trap_stats` of a trace store (a run directory or store path readable by `TraceReader`;
    allow_foreign: read files of other runs, see `TraceReader`)."""
    from kat_diag.traces.reader import TraceReader
    from kat_diag.traces.schema import UNKNOWN_POSITION

    columns = ["kl", "correct", "step", "first_error", "loop_start", "rollout_id"]
    b = TraceReader(store, allow_foreign=allow_foreign).read(columns=columns)
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
                      steps=np.asarray(b["step"]), first_error=err, loop_start=loop,
                      rollout_ids=np.asarray(b["rollout_id"]))
