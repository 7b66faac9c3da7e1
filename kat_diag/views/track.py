"""Why a rollout was cut: the detector's evidence token by token, and where the student left the teacher.

KAT fires when the window mean of the reverse KL, z_t = mean(d_{t-W+1..t}), stays below tau for T
consecutive windows after the exempt length L0. `inspect` has to show exactly that, next to what
the embedded world knows (first error, loop start, verdict) and what the teacher preferred, so a
reader can judge a cut at a glance. This module computes it from one trace row; `terminal` and
`html` only draw it.

* `window_track`: per token the KL, z_t, the low flag (the detector's own, exact: the same replay
  the analyses use), the persistence count (consecutive low windows ending at t), and the marks
  (L0, onset, fire, recorded and replayed, first error, loop start, kept end).
* `departures`: every token that is not the teacher's top-1 there, with its probability and rank
  under the teacher and the teacher's alternatives (text and probability).
* `student_answer`: the final answer the completion states (marker, boxed or gsm8k form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kat_diag.kat.config import KATConfig
from kat_diag.kat.replay import replay


@dataclass(frozen=True)
class Track:
    """The detector's view of one rollout (per-token arrays have the rollout's length)."""

    window: int
    persistence: int
    min_length: int
    tau: float | None  # the threshold the track is drawn against (None: undefined, KAT inactive)
    tau_source: str  # "recorded", "given" or "undefined"
    kl: np.ndarray
    z: np.ndarray  # window mean ending at t (NaN for t < W - 1)
    low: np.ndarray  # window ending at t usable and below tau
    count: np.ndarray  # consecutive low windows ending at t
    onset: int  # replayed at tau (-1 none)
    fire: int
    recorded_onset: int
    recorded_fire: int
    first_error: int  # -1 none, -2 unknown (no ground truth)
    loop_start: int
    kept: int
    marks: dict[str, int] = field(default_factory=dict)  # name -> token position (only defined marks)

    @property
    def min_window(self) -> float:
        ok = np.isfinite(self.z)
        return float(self.z[ok].min()) if ok.any() else math.nan

    @property
    def min_window_at(self) -> int:
        ok = np.isfinite(self.z)
        return int(np.nanargmin(np.where(ok, self.z, np.inf))) if ok.any() else -1


MARK_ORDER = ("L0", "first_error", "loop_start", "onset", "fire", "kept_end")
MARK_GLYPHS = {"L0": "L", "first_error": "E", "loop_start": "R", "onset": "O", "fire": "F", "kept_end": "K"}
MARK_NAMES = {"L0": "L0", "first_error": "first error", "loop_start": "loop start", "onset": "onset",
              "fire": "fire", "kept_end": "kept end"}


def window_means(kl: np.ndarray, window: int) -> np.ndarray:
    """z_t = mean(kl[t-W+1..t]) for t >= W - 1, NaN before (and where the window holds a non-finite KL)."""
    kl = np.asarray(kl, dtype=np.float64)
    n = kl.shape[0]
    out = np.full(n, np.nan)
    if n < window or window < 1:
        return out
    ok = np.isfinite(kl)
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, kl, 0.0))])
    bad = np.concatenate([[0], np.cumsum(~ok)])
    sums = cs[window:] - cs[:-window]
    clean = (bad[window:] - bad[:-window]) == 0
    out[window - 1:] = np.where(clean, sums / window, np.nan)
    return out


def run_count(low: np.ndarray) -> np.ndarray:
    """Length of the run of True ending at each position (0 where False)."""
    low = np.asarray(low, dtype=bool)
    idx = np.arange(low.shape[0])
    last_false = np.maximum.accumulate(np.where(~low, idx, -1))
    return np.where(low, idx - last_false, 0).astype(np.int64)


def _int(row: dict[str, Any], key: str, default: int = -1) -> int:
    v = row.get(key)
    if v is None:
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def window_track(row: dict[str, Any], cfg: KATConfig, tau: float | None = None) -> Track:
    """The track of one rollout at ``tau`` (default: the rollout's recorded tau)."""
    kl = np.asarray(row["kl"], dtype=np.float64)
    n = kl.shape[0]
    source = "given"
    if tau is None:
        rec = row.get("tau")
        tau = None if rec is None or not math.isfinite(float(rec)) else float(rec)
        source = "recorded" if tau is not None else "undefined"
    if tau is not None and n:
        res = replay(kl, np.array([0, n], dtype=np.int64), cfg, np.array([tau]), return_low=True)
        low = np.asarray(res.low, dtype=bool)
        onset, fire = int(res.onset[0]), int(res.fire[0])
    else:
        low = np.zeros(n, dtype=bool)
        onset = fire = -1
    kept = _int(row, "kept_len", n)
    marks: dict[str, int] = {}
    if 0 < cfg.min_length <= n:
        marks["L0"] = cfg.min_length
    for name, value in (("first_error", _int(row, "first_error")), ("loop_start", _int(row, "loop_start")),
                        ("onset", _int(row, "onset") if _int(row, "onset") >= 0 else onset),
                        ("fire", _int(row, "fire") if _int(row, "fire") >= 0 else fire)):
        if 0 <= value <= n:
            marks[name] = value
    if 0 <= kept < n:
        marks["kept_end"] = kept
    return Track(window=cfg.window, persistence=cfg.persistence, min_length=cfg.min_length, tau=tau,
                 tau_source=source, kl=kl, z=window_means(kl, cfg.window), low=low, count=run_count(low),
                 onset=onset, fire=fire, recorded_onset=_int(row, "onset"), recorded_fire=_int(row, "fire"),
                 first_error=_int(row, "first_error", -2), loop_start=_int(row, "loop_start", -2), kept=kept,
                 marks=marks)


@dataclass(frozen=True)
class Departure:
    """A token that is not the teacher's top-1 at its position."""

    pos: int
    token: str
    teacher_prob: float  # p_T(y_t) = exp(teacher logprob of the sampled token)
    rank: int | None  # 1-based rank among the teacher's stored top-n; None: outside it
    alternatives: tuple[tuple[str, float], ...]  # the teacher's top-n (text, probability)


def teacher_ranks(row: dict[str, Any]) -> np.ndarray | None:
    """Per token: rank of the sampled token among the teacher's top-n (1 = its top-1, 0 = outside
    the stored top-n); None when the store has no teacher top ids."""
    ids = row.get("token_ids")
    top = row.get("teacher_top_ids")
    if ids is None or top is None or len(top) != len(ids) or len(ids) == 0:
        return None
    top_NK = np.asarray([np.asarray(t) for t in top]).reshape(len(ids), -1)
    hit_NK = top_NK == np.asarray(ids).reshape(-1, 1)
    return np.where(hit_NK.any(1), hit_NK.argmax(1) + 1, 0).astype(np.int64)


def departures(row: dict[str, Any], strings: list[str] | None, decode: Any = None) -> list[Departure]:
    """Every position whose token is not the teacher's top-1 (in order). ``decode(id) -> text``
    names the alternatives (else ``⟨id⟩``)."""
    ranks = teacher_ranks(row)
    if ranks is None:
        return []
    ids = row["token_ids"]
    top_ids, top_probs = row["teacher_top_ids"], row.get("teacher_top_probs")
    lp = row.get("teacher_logprob")
    out = []
    for t in np.flatnonzero(ranks != 1).tolist():
        probs = top_probs[t] if top_probs is not None else [math.nan] * len(top_ids[t])
        alts = tuple((decode(int(i)) if decode is not None else f"⟨{int(i)}⟩", float(p))
                     for i, p in zip(top_ids[t], probs, strict=False) if int(i) >= 0)
        p_t = math.exp(float(lp[t])) if lp is not None and math.isfinite(float(lp[t])) else math.nan
        text = strings[t] if strings is not None else f"⟨{int(ids[t])}⟩"
        out.append(Departure(pos=int(t), token=text, teacher_prob=p_t, rank=int(ranks[t]) or None,
                             alternatives=alts))
    return out


def student_answer(text: str | None) -> str | None:
    """The completion's final answer: \\boxed{...}, else `#### x`, else the world's `#x` marker."""
    if not text:
        return None
    from kat_diag.data.grading import extract_arith_answer, extract_boxed, extract_gsm8k_answer

    return extract_boxed(text) or extract_gsm8k_answer(text) or extract_arith_answer(text)


def verdict_of(row: dict[str, Any]) -> str:
    """The rollout's verdict: the store's ground truth (right | wrong | loop | unfinished) when
    present, else from the grade (right / wrong; a rollout a policy stopped is unfinished), else
    ungraded."""
    v = row.get("verdict")
    if isinstance(v, str) and v:
        return v
    c = row.get("correct")
    if c is None or (isinstance(c, (int, np.integer)) and int(c) < 0):
        return "ungraded"
    if bool(c):
        return "right"
    return "unfinished" if str(row.get("stop_reason")) == "policy" else "wrong"


def verdicts(verdict: np.ndarray | list[Any] | None, correct: np.ndarray, stop_reason: np.ndarray | None = None
             ) -> np.ndarray:
    """`verdict_of` for columns: verdict (object, None = unknown), correct (int8: 1, 0, -1 ungraded)."""
    correct = np.asarray(correct)
    n = correct.shape[0]
    v = np.asarray(verdict if verdict is not None else [None] * n, dtype=object)
    stop = np.asarray(stop_reason if stop_reason is not None else [""] * n, dtype=object)
    out = np.where(correct == 1, "right", np.where(correct == 0, np.where(stop == "policy", "unfinished", "wrong"),
                                                   "ungraded")).astype(object)
    known = np.array([isinstance(x, str) and x != "" for x in v], dtype=bool)
    out[known] = v[known]
    return out.astype(str)
