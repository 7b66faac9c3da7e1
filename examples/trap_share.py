"""How often does the embedded world show the agreement trap, and does KAT separate it?

Reads a trace store recorded with `kat-diag record` (policy none: full rollouts), finds in each
arithmetic rollout the first wrong step (a result that does not follow from its operands, or a
line that does not continue from the previous result), and reports, for right and wrong rollouts:
the share KAT fires on (offline replay with tau = the eta-quantile of the store's window means),
the mean KL before and after the first error, and where the onset falls relative to it.

    kat-diag record --split ops5 --n-prompts 200 --samples 4 --out runs/rec_ops5
    python examples/trap_share.py runs/rec_ops5 [--window 16 --persistence 8 --min-length 32 --eta 0.2]

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from kat_diag.detector import KATConfig
from kat_diag.replay import replay
from kat_diag.traces import TraceReader

LINE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")


def first_error(prompt_first: int | None, text: str) -> tuple[int, int]:
    """(start, end) character span of the first wrong step line's result in `text`: start is the
    first character after "=", end the line's end; (-1, -1) when no arithmetic error is found."""
    pos, prev = 0, prompt_first
    for line in text.split("\n"):
        m = LINE.match(line)
        if m:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            want = {"+": a + b, "-": a - b, "*": a * b}[op]
            if (prev is not None and a != prev) or c != want:
                return pos + line.index("=") + 1, pos + len(line)
            prev = c
        pos += len(line) + 1
    return -1, -1


def n_errors(text: str) -> int:
    """Number of step lines whose result does not follow from their own operands (a line that
    continues consistently from a wrong previous result is not an error)."""
    n = 0
    for line in text.split("\n"):
        m = LINE.match(line)
        if m and int(m[4]) != {"+": int(m[1]) + int(m[3]), "-": int(m[1]) - int(m[3]),
                               "*": int(m[1]) * int(m[3])}[m[2]]:
            n += 1
    return n


def loops(text: str) -> bool:
    """A repetition loop: some step line occurs twice in a row."""
    lines = [ln for ln in text.split("\n") if ln]
    return any(a == b for a, b in zip(lines, lines[1:], strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--persistence", type=int, default=8)
    ap.add_argument("--min-length", type=int, default=32)
    ap.add_argument("--eta", type=float, default=0.2)
    args = ap.parse_args()
    cfg = KATConfig(window=args.window, persistence=args.persistence, min_length=args.min_length,
                    tau_quantile=args.eta, statistic="windows", min_fill=1,
                    warmup_steps=0)
    b = TraceReader(args.run).read(columns=["kl", "text", "correct", "gen_len"])
    kl, off = b["kl"].values.astype(np.float64), b["kl"].offsets
    # tau: eta-quantile of the stride-W window means of every rollout (what KAT's buffer would hold).
    means = []
    for i in range(len(off) - 1):
        x = kl[off[i] : off[i + 1]]
        n = len(x) // cfg.window
        if n:
            means.append(x[: n * cfg.window].reshape(n, cfg.window).mean(1))
    tau = float(np.quantile(np.concatenate(means), cfg.tau_quantile))
    res = replay(kl, off, cfg, tau)
    correct = b["correct"] == 1
    spans = np.array([first_error(None, t) for t in b["text"]]).reshape(-1, 2)
    err, err_end = spans[:, 0], spans[:, 1]
    out: dict[str, float] = {"rollouts": int(len(correct)), "accuracy": float(correct.mean()), "tau": tau,
                             "mean_gen_len": float(np.mean(b["gen_len"]))}
    fired = res.fire >= 0
    looped = np.array([loops(t) for t in b["text"]])
    out["loop_share"] = float(looped.mean())
    groups = (("right", correct), ("wrong", ~correct), ("loop", looped), ("wrong_no_loop", ~correct & ~looped))
    for name, sel in groups:
        out[f"fired_share_{name}"] = float(fired[sel].mean()) if sel.any() else float("nan")
    wrong_err = ~correct & (err >= 0)
    out["wrong_with_arith_error_share"] = float(wrong_err.sum() / max(1, (~correct).sum()))
    before, after, after_single = [], [], []
    single = np.array([n_errors(t) == 1 for t in b["text"]])
    onset_after_error = []
    for i in np.flatnonzero(wrong_err):
        x = kl[off[i] : off[i + 1]]
        e, e_end = err[i], err_end[i]
        if 0 < e and e_end + 1 < len(x):
            before.append(x[:e].mean())
            after.append(x[e_end + 1 :].mean())  # the lines after the wrong result's line
            if single[i]:  # the rest continues consistently from the wrong value
                after_single.append(x[e_end + 1 :].mean())
        if fired[i]:
            onset_after_error.append(res.onset[i] >= e)
    out["wrong_mean_kl_before_error"] = float(np.mean(before)) if before else float("nan")
    out["wrong_mean_kl_after_error"] = float(np.mean(after)) if after else float("nan")
    out["wrong_single_error_share"] = float(len(after_single) / max(1, len(after)))
    out["wrong_single_error_mean_kl_after"] = float(np.mean(after_single)) if after_single else float("nan")
    share = float(np.mean(onset_after_error)) if onset_after_error else float("nan")
    out["wrong_fired_onset_after_error_share"] = share
    right_kl = [kl[off[i] : off[i + 1]].mean() for i in np.flatnonzero(correct)]
    out["right_mean_kl"] = float(np.mean(right_kl)) if right_kl else float("nan")
    loop_kl = [kl[off[i] : off[i + 1]].mean() for i in np.flatnonzero(looped)]
    out["loop_mean_kl"] = float(np.mean(loop_kl)) if loop_kl else float("nan")
    # Where KAT cuts a loop: share of its tokens kept (the pre-agreement prefix).
    sel = looped & fired
    out["loop_kept_share"] = float(np.mean(res.keep[sel] / res.length[sel])) if sel.any() else float("nan")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
