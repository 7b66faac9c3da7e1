"""Termination policies: when to stop a rollout, and how much of it to train on.

The rollout engine talks to every policy through one interface, so OPD, KAT and the baselines
of docs/kat.md (random length-matched termination, fixed prefix, KAT inside a prefix budget) run
through the same code path and differ only in the object `make_policy` returns.

Interface (`TerminationPolicy`), all per-row state vectorised over the engine's live batch:

    policy.begin_step(step)            # once per training step, before any rollout (KAT: tau)
    budget = policy.max_new_tokens(default)   # generation budget (prefix policies: min(P, default))
    policy.add_rows(n)                 # n new rollouts start, appended as the last n rows
    loop:
        dec = policy.update(kl_BC, valid_BC)  # C new tokens per row (valid tokens: row prefix)
        # dec.stop_B  bool  (B,): stop this rollout (sticky: stays True once set)
        # dec.end_B   int64 (B,): where stop_B, the rollout's final length; tokens generated
        #                         beyond it (chunked scoring) are to be discarded; -1 elsewhere
        # dec.keep_B  int64 (B,): where stop_B, train on tokens [0, keep_B); -1 elsewhere
        #   (the three tensors are snapshots: later calls never modify them)
        policy.keep_rows(idx_B)        # compaction: keep these rows, in this order (finished
                                       # rows not in idx_B are booked for the step's metrics)
        policy.add_rows(k)             # refill freed slots
    metrics = policy.end_step(kl_by_rollout)   # dict[str, float]; drops remaining rows; KAT
                                       # pushes what the step's finished rollouts contribute
                                       # (their stored KL, in prompt order; gathered over ranks)
                                       # into its threshold buffer here
    policy.row_info()                  # per live row: tokens, stopped, keep, end, fire, onset
    policy.state_dict() / load_state_dict(state)   # what persists across steps (KAT buffer and
                                       # tau, random generator); take it between steps

A rollout that ends on its own (EOS, budget) trains on all its tokens; `keep_B`/`end_B` only
describe rollouts the policy stopped. Metrics of every policy share the keys `rollouts`,
`stopped_share`, `gen_len_mean`, `kept_len_mean`, `tokens_generated`, `tokens_kept`; KAT adds
`tau` (the threshold in force: NaN while inactive), `buffer_quantile` (the buffer's quantile,
defined once B_min values are in, active or not), `kat_active`, `tau_at_floor` (1: active with
tau <= 0, where it cannot fire; warned once, see `detector.at_resolution_floor`), `fired_share`, `onset_mean`,
`fire_mean`, `nonfinite_count`, `buffer_added`, `buffer_size`.

Policies: `none` (plain OPD), `kat`, `random`, `prefix`, `kat+prefix`.

`random` cuts a rollout after a geometric number of tokens G (support 1, 2, ...), drawn from a
seeded `torch.Generator` when the row is added (memoryless, so it does not depend on how the
engine chunks tokens). It is length-matched on the *realised* mean kept length: a rollout that
ends on its own (EOS, budget) before its cut keeps fewer tokens than drawn, so a geometric cut
with mean = target keeps far less than the target where natural endings are short. Before each
step the policy picks the stop probability p with E[min(G, N)] = goal, where N is the natural
length, estimated by Kaplan-Meier (`survival`) from the rollouts of its last `memory_steps`
steps (a rollout that ended on its own is an observed length; a cut one is censored at its cut),
and goal = 2 target - (realised mean kept length so far), clipped to [target/2, 2 target], so a
shortfall of earlier steps is made up. Before any data: the first recorded step of the KAT run
(`prior_from_run`: in KAT's warm-up nothing is cut), else p = 1/target. If the target exceeds the
mean natural length, p = 0 (never cut). The target is a mean kept length given directly, or read
from a KAT run's metrics.jsonl (`target_from_metrics`: the rollout-weighted mean of
`kept_len_mean`); metrics report `random_target`, `random_goal`, `random_stop_prob` and
`random_kept_len_run_mean` (realised so far) next to the step's `kept_len_mean`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import (
    AdaptiveThreshold,
    KATResolutionWarning,
    StreamingDetector,
    at_resolution_floor,
    buffer_values_of,
    floor_message,
)

POLICY_NAMES = ("none", "kat", "random", "prefix", "kat+prefix")


@dataclass(frozen=True)
class StopDecision:
    """Result of `TerminationPolicy.update` for the live rows (see module docstring)."""

    stop_B: torch.Tensor  # bool
    keep_B: torch.Tensor  # int64, -1 where not stopped
    end_B: torch.Tensor  # int64, -1 where not stopped


@runtime_checkable
class TerminationPolicy(Protocol):
    """The interface the rollout engine uses (see module docstring for the call sequence)."""

    name: str

    def begin_step(self, step: int) -> None: ...

    def add_rows(self, n: int) -> None: ...

    def keep_rows(self, idx_B: torch.Tensor) -> None: ...

    def update(self, kl_BC: torch.Tensor, valid_BC: torch.Tensor | None = None) -> StopDecision: ...

    def max_new_tokens(self, default: int) -> int: ...

    def row_info(self) -> dict[str, torch.Tensor]: ...

    def end_step(self, kl_by_rollout: Sequence[Any] | None = None) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


class _RowPolicy:
    """Shared row bookkeeping: tokens seen, sticky stop decisions, per-step finished rows."""

    name = "base"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._step = -1
        self._new_rows()
        self._done: list[dict[str, torch.Tensor]] = []

    # -- hooks for subclasses
    def _stop(self, kl_BC: torch.Tensor, valid_BC: torch.Tensor | None,
              nvalid_B: torch.Tensor | int) -> torch.Tensor | None:
        """Rows to stop given this chunk (bool (B,)), or None for none. Runs on every update."""
        return None

    def _keep_end(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep_B, end_B) for the rows `_stop` just stopped; only called when some row is new."""
        raise NotImplementedError

    def _fire_onset(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.full_like(self._n_B, -1)
        return m, m

    def _add_rows_hook(self, n: int) -> None:
        pass

    def _keep_rows_hook(self, idx_B: torch.Tensor) -> None:
        pass

    def _step_metrics(self, done: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    # -- interface
    def _new_rows(self) -> None:
        i64 = dict(dtype=torch.int64, device=self.device)
        self._n_B = torch.zeros(0, **i64)
        self._stop_B = torch.zeros(0, dtype=torch.bool, device=self.device)
        self._keep_B = torch.zeros(0, **i64)
        self._end_B = torch.zeros(0, **i64)

    @property
    def num_rows(self) -> int:
        return int(self._n_B.shape[0])

    def begin_step(self, step: int) -> None:
        if self.num_rows:
            raise RuntimeError(f"begin_step({step}) with {self.num_rows} rollouts in flight; "
                               "call end_step first")
        self._step = int(step)
        self._done = []

    def max_new_tokens(self, default: int) -> int:
        return default

    def add_rows(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"add_rows: n={n} must be >= 0")
        i64 = dict(dtype=torch.int64, device=self.device)
        self._n_B = torch.cat([self._n_B, torch.zeros(n, **i64)])
        self._stop_B = torch.cat([self._stop_B, torch.zeros(n, dtype=torch.bool, device=self.device)])
        self._keep_B = torch.cat([self._keep_B, torch.full((n,), -1, **i64)])
        self._end_B = torch.cat([self._end_B, torch.full((n,), -1, **i64)])
        self._add_rows_hook(n)

    def keep_rows(self, idx_B: torch.Tensor) -> None:
        idx_B = torch.as_tensor(idx_B, dtype=torch.int64, device=self.device).reshape(-1)
        kept = torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        kept[idx_B] = True
        self._book(~kept)
        for name in ("_n_B", "_stop_B", "_keep_B", "_end_B"):
            setattr(self, name, getattr(self, name)[idx_B])
        self._keep_rows_hook(idx_B)

    def _book(self, rows_B: torch.Tensor) -> None:
        """Record finished rows (bool mask) for the step metrics."""
        fire_B, onset_B = self._fire_onset()
        info = self._info(fire_B, onset_B)
        self._done.append({k: v[rows_B] for k, v in info.items()})

    def _info(self, fire_B: torch.Tensor, onset_B: torch.Tensor) -> dict[str, torch.Tensor]:
        stopped = self._stop_B
        return {
            "tokens": torch.where(stopped, self._end_B, self._n_B),
            "kept": torch.where(stopped, self._keep_B, self._n_B),
            "stopped": stopped,
            "fire": fire_B,
            "onset": onset_B,
        }

    def row_info(self) -> dict[str, torch.Tensor]:
        """Per live row: tokens (final length if stopped), kept, stopped, keep, end, fire, onset."""
        info = self._info(*self._fire_onset())
        info.update(keep=self._keep_B.clone(), end=self._end_B.clone())
        return info

    def update(self, kl_BC: torch.Tensor, valid_BC: torch.Tensor | None = None) -> StopDecision:
        if kl_BC.dim() != 2 or kl_BC.shape[0] != self.num_rows:
            raise ValueError(f"update: kl_BC of shape {tuple(kl_BC.shape)}, policy has {self.num_rows} rows")
        if kl_BC.device != self.device:
            self._to(kl_BC.device)
        nvalid_B: torch.Tensor | int = kl_BC.shape[1]
        if valid_BC is not None:
            valid_BC = valid_BC.to(device=self.device, dtype=torch.bool)
            nvalid_B = valid_BC.sum(1)
        stop_B = self._stop(kl_BC, valid_BC, nvalid_B)
        if stop_B is not None:
            new_B = stop_B > self._stop_B  # stopped now, not before
            if bool(new_B.any()):  # rare: keep/end bookkeeping only when a row stops
                keep_B, end_B = self._keep_end()
                self._keep_B = torch.where(new_B, keep_B, self._keep_B)
                self._end_B = torch.where(new_B, end_B, self._end_B)
                self._stop_B = self._stop_B | new_B
        self._n_B = self._n_B + nvalid_B
        # State tensors are replaced, never modified in place: the decision needs no copies.
        return StopDecision(self._stop_B, self._keep_B, self._end_B)

    def _to(self, device: torch.device) -> None:
        for name in ("_n_B", "_stop_B", "_keep_B", "_end_B"):
            setattr(self, name, getattr(self, name).to(device))
        self.device = device

    def end_step(self, kl_by_rollout: Sequence[Any] | None = None) -> dict[str, float]:
        """Close the step; `kl_by_rollout` (the step's finished rollouts' stored KL, in prompt order)
        is only used by policies that learn from it (KAT)."""
        self._book(torch.ones(self.num_rows, dtype=torch.bool, device=self.device))
        self._new_rows()
        self._keep_rows_hook(torch.zeros(0, dtype=torch.int64, device=self.device))
        done = {k: torch.cat([d[k] for d in self._done]) for k in self._done[0]}
        self._done = []
        tokens, kept, stopped = done["tokens"], done["kept"], done["stopped"]
        metrics = {
            "step": float(self._step),
            "rollouts": float(tokens.numel()),
            "stopped_share": _mean(stopped),
            "gen_len_mean": _mean(tokens),
            "kept_len_mean": _mean(kept),
            "tokens_generated": float(tokens.sum()),
            "tokens_kept": float(kept.sum()),
        }
        metrics.update(self._step_metrics(done))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict of policy {state.get('name')!r} loaded into {self.name!r}")
        self._step = int(state["step"])


class NonePolicy(_RowPolicy):
    """Plain OPD: never stops a rollout, trains on every token."""

    name = "none"


class PrefixPolicy(_RowPolicy):
    """Prefix-only OPD: generate and train on the first P tokens."""

    name = "prefix"

    def __init__(self, prefix_len: int, device: str | torch.device = "cpu") -> None:
        _check_prefix(prefix_len)
        super().__init__(device)
        self.prefix_len = int(prefix_len)

    def max_new_tokens(self, default: int) -> int:
        return min(self.prefix_len, default)

    def _stop(self, kl_BC: torch.Tensor, valid_BC: torch.Tensor | None,
              nvalid_B: torch.Tensor | int) -> torch.Tensor | None:
        return self._n_B + nvalid_B >= self.prefix_len

    def _keep_end(self) -> tuple[torch.Tensor, torch.Tensor]:
        full_B = torch.full_like(self._n_B, self.prefix_len)
        return full_B, full_B

    def _step_metrics(self, done: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"prefix_len": float(self.prefix_len)}


class RandomPolicy(_RowPolicy):
    """Random termination whose realised mean kept length matches `target` (see module doc)."""

    name = "random"
    NO_CUT = 2**62  # a cut no rollout reaches (stop probability 0)

    def __init__(self, target: float, seed: int = 0, device: str | torch.device = "cpu", *,
                 prior: tuple[Any, Any] | None = None, memory_steps: int = 4) -> None:
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target >= 1.0):
            raise ValueError(f"random termination: target mean kept length {target!r} must be >= 1")
        if memory_steps < 1:
            raise ValueError(f"random termination: memory_steps={memory_steps} must be >= 1")
        super().__init__(device)
        self.target = float(target)
        self.memory_steps = int(memory_steps)
        self.stop_prob = 1.0 / self.target
        self.goal = self.target
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(int(seed))
        self._cut_B = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._budget = 0  # generation budget seen in max_new_tokens (0: not known yet)
        # Per recent step: (lengths, ended_on_own) of its rollouts, for the survival estimate.
        self._hist: list[tuple[torch.Tensor, torch.Tensor]] = []
        if prior is not None:
            lengths, events = (torch.as_tensor(x).reshape(-1) for x in prior)
            if lengths.numel():
                self._hist.append((lengths.to(torch.int64).cpu(), events.to(torch.bool).cpu()))
        self._cum_rollouts = 0.0
        self._cum_kept = 0.0

    # -- the controller
    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self.goal = self.target
        if self._cum_rollouts > 0:  # catch up on what earlier steps missed (bounded correction)
            realised = self._cum_kept / self._cum_rollouts
            self.goal = min(max(2.0 * self.target - realised, 0.5 * self.target), 2.0 * self.target)
        if self._hist:
            lengths = torch.cat([h[0] for h in self._hist]).numpy()
            events = torch.cat([h[1] for h in self._hist]).numpy()
            self.stop_prob = stop_prob_for_mean_kept(lengths, events, self.goal, self._budget or None)
        else:
            self.stop_prob = 1.0 / self.goal

    def max_new_tokens(self, default: int) -> int:
        self._budget = int(default)
        return default

    def _add_rows_hook(self, n: int) -> None:
        if self.stop_prob <= 0.0:
            cut = torch.full((n,), self.NO_CUT, dtype=torch.int64)
        else:
            draw = torch.empty(n, dtype=torch.float64).geometric_(self.stop_prob, generator=self._gen)
            cut = draw.clamp(max=float(self.NO_CUT)).to(torch.int64)
        self._cut_B = torch.cat([self._cut_B, cut.to(self.device)])

    def _keep_rows_hook(self, idx_B: torch.Tensor) -> None:
        self._cut_B = self._cut_B[idx_B]

    def _to(self, device: torch.device) -> None:
        super()._to(device)
        self._cut_B = self._cut_B.to(device)

    def _stop(self, kl_BC: torch.Tensor, valid_BC: torch.Tensor | None,
              nvalid_B: torch.Tensor | int) -> torch.Tensor | None:
        return self._n_B + nvalid_B >= self._cut_B

    def _keep_end(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cut_B, self._cut_B

    def row_info(self) -> dict[str, torch.Tensor]:
        info = super().row_info()
        info["cut"] = self._cut_B.clone()
        return info

    def _step_metrics(self, done: dict[str, torch.Tensor]) -> dict[str, float]:
        # The step's rollouts feed the controller: a rollout that ended on its own (EOS or
        # budget) has natural length = its length; a cut one is censored at its cut.
        tokens, kept, stopped = (done[k].cpu() for k in ("tokens", "kept", "stopped"))
        if tokens.numel():
            self._hist = (self._hist + [(tokens.to(torch.int64), ~stopped)])[-self.memory_steps:]
        self._cum_rollouts += float(tokens.numel())
        self._cum_kept += float(kept.sum())
        return {"random_target": self.target, "random_goal": self.goal, "random_stop_prob": self.stop_prob,
                "random_kept_len_run_mean": self._cum_kept / max(self._cum_rollouts, 1.0)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "target": self.target, "generator": self._gen.get_state(),
                "stop_prob": self.stop_prob, "goal": self.goal, "budget": self._budget,
                "hist": [(a.clone(), b.clone()) for a, b in self._hist],
                "cum": [self._cum_rollouts, self._cum_kept]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.target = float(state["target"])
        self._gen.set_state(state["generator"])
        self.stop_prob = float(state.get("stop_prob", 1.0 / self.target))
        self.goal = float(state.get("goal", self.target))
        self._budget = int(state.get("budget", 0))
        self._hist = [(torch.as_tensor(a), torch.as_tensor(b)) for a, b in state.get("hist", [])]
        self._cum_rollouts, self._cum_kept = (float(x) for x in state.get("cum", [0.0, 0.0]))


def survival(lengths: Any, ended: Any, horizon: int) -> np.ndarray:
    """Kaplan-Meier S(t) = P(natural length >= t) for t = 1..horizon (index t-1).

    `lengths` are rollout lengths; `ended` says the rollout ended on its own there (an event),
    else it was cut there (censored: its natural length is >= the length). Beyond the last
    observation S stays at its last value (0 when the longest rollout ended on its own).
    """
    n = np.asarray(lengths, dtype=np.int64).reshape(-1)
    e = np.asarray(ended, dtype=bool).reshape(-1)
    if n.size == 0:
        return np.ones(horizon)
    top = max(int(n.max()), horizon) + 1
    at_risk = np.cumsum(np.bincount(n, minlength=top + 1)[::-1])[::-1]  # #{n_i >= t}
    deaths = np.bincount(n[e], minlength=top + 1)  # #{n_i == t, ended on its own}
    hazard = np.divide(deaths, at_risk, out=np.zeros(top + 1), where=at_risk > 0)
    # S(1) = 1 (every rollout has a token); S(t+1) = S(t) (1 - h(t)).
    surv = np.concatenate([[1.0], np.cumprod(1.0 - hazard[1:])])
    return surv[:horizon]


def stop_prob_for_mean_kept(lengths: Any, ended: Any, goal: float, budget: int | None = None) -> float:
    """Per-token stop probability p of a geometric cut G (support 1, 2, ...) with
    E[min(G, N)] = goal, N the natural length estimated by `survival`.

    E[min(G, N)] = sum_{t>=1} P(G >= t) P(N >= t) = sum_t (1 - p)^(t-1) S(t), decreasing in p
    from E[N] (p = 0) to 1 (p = 1); solved by bisection. Returns 0 (never cut) when the goal is
    at or above E[N], and 1 when it is <= 1.
    """
    n = np.asarray(lengths, dtype=np.int64).reshape(-1)
    horizon = int(budget) if budget else (int(n.max()) if n.size else 1)
    horizon = max(horizon, int(n.max()) if n.size else 1)
    s = survival(n, ended, horizon)
    if goal >= float(s.sum()):
        return 0.0
    if goal <= 1.0:
        return 1.0
    t = np.arange(horizon, dtype=np.float64)
    lo, hi = 0.0, 1.0  # q = 1 - p: f(q) = sum q^t S(t+1) increases with q
    for _ in range(60):
        q = 0.5 * (lo + hi)
        if float(np.sum(np.power(q, t) * s)) < goal:
            lo = q
        else:
            hi = q
    return 1.0 - 0.5 * (lo + hi)


class KATPolicy(_RowPolicy):
    """KAT, optionally inside a prefix budget P (`kat+prefix`): the detector only sees tokens < P.

    `gather` (several processes): maps this rank's buffer values to every rank's, concatenated in
    rank order (`kat_diag.opd.distributed.all_gather_values`), so all ranks hold the same buffer and
    use the same threshold each step.
    """

    name = "kat"

    def __init__(self, cfg: KATConfig, prefix_len: int | None = None,
                 device: str | torch.device = "cpu",
                 gather: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if prefix_len is not None:
            _check_prefix(prefix_len)
            self.name = "kat+prefix"
        super().__init__(device)
        self.cfg = cfg
        self.prefix_len = None if prefix_len is None else int(prefix_len)
        self.threshold = AdaptiveThreshold(cfg)
        self.detector = StreamingDetector(cfg, device=self.device)
        self.gather = gather
        self._nonfinite_at_begin = 0
        self._floor_warned = False
        self._idx_cache: dict[int, torch.Tensor] = {}
        self._fired_B = torch.zeros(0, dtype=torch.bool, device=self.device)

    def _to(self, device: torch.device) -> None:
        super()._to(device)
        self._idx_cache = {}

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self.threshold.begin_step(step)
        self.detector.set_tau(self.threshold.effective_tau)
        self._nonfinite_at_begin = self.detector.nonfinite_count
        if at_resolution_floor(self.threshold.effective_tau) and not self._floor_warned:
            self._floor_warned = True  # once per run: the metric `tau_at_floor` says it every step
            warnings.warn(floor_message(self.threshold.effective_tau, f"at step {step}"), KATResolutionWarning,
                          stacklevel=2)

    def max_new_tokens(self, default: int) -> int:
        return default if self.prefix_len is None else min(self.prefix_len, default)

    def _add_rows_hook(self, n: int) -> None:
        self.detector.add_rows(n)

    def _keep_rows_hook(self, idx_B: torch.Tensor) -> None:
        self.detector.keep_rows(idx_B)

    def _fire_onset(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.fire_B.to(self.device), self.detector.onset_B.to(self.device)

    def _stop(self, kl_BC: torch.Tensor, valid_BC: torch.Tensor | None,
              nvalid_B: torch.Tensor | int) -> torch.Tensor | None:
        p = self.prefix_len
        if p is None:
            self._fired_B = self.detector.update(kl_BC, valid_BC).to(self.device)
            return self._fired_B
        c = kl_BC.shape[1]
        if c not in self._idx_cache:
            self._idx_cache[c] = torch.arange(c, device=self.device)
        inside_BC = (self._n_B[:, None] + self._idx_cache[c]) < p  # the detector never sees >= P
        valid_BC = inside_BC if valid_BC is None else valid_BC & inside_BC
        self._fired_B = self.detector.update(kl_BC, valid_BC).to(self.device)
        return self._fired_B | (self._n_B + nvalid_B >= p)

    def _keep_end(self) -> tuple[torch.Tensor, torch.Tensor]:
        fire_B = self.detector.fire_B.to(self.device)
        keep_B = self.detector.keep_B.to(self.device)
        if self.prefix_len is None:
            return keep_B, fire_B + 1
        full_B = torch.full_like(fire_B, self.prefix_len)
        return torch.where(self._fired_B, keep_B, full_B), torch.where(self._fired_B, fire_B + 1, full_B)

    def end_step(self, kl_by_rollout: Sequence[Any] | None = None) -> dict[str, float]:
        """Close the step and push what its rollouts contribute into the threshold buffer.

        kl_by_rollout: the KL of every rollout of the step, exactly the tokens it kept (a rollout
        stopped at fire ends there), in prompt order. Required: KAT without it would never learn
        its threshold.
        """
        if kl_by_rollout is None:
            raise ValueError("KATPolicy.end_step needs the step's rollouts' KL (kl_by_rollout) to update "
                             "its threshold buffer")
        metrics = super().end_step()
        values = buffer_values_of(kl_by_rollout, self.cfg)
        if self.gather is not None:
            values = self.gather(values)
        added = self.threshold.observe(values)
        metrics.update(buffer_added=float(added), buffer_size=float(self.threshold.buffer.numel()))
        return metrics

    def _step_metrics(self, done: dict[str, torch.Tensor]) -> dict[str, float]:
        fired = done["fire"] >= 0
        return {
            "tau": self.threshold.effective_tau,
            "buffer_quantile": self.threshold.tau,
            "kat_active": float(self.threshold.active),
            "tau_at_floor": float(at_resolution_floor(self.threshold.effective_tau)),
            "fired_share": _mean(fired),
            "onset_mean": _mean(done["onset"][fired]),
            "fire_mean": _mean(done["fire"][fired]),
            "nonfinite_count": float(self.detector.nonfinite_count - self._nonfinite_at_begin),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "threshold": self.threshold.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold.load_state_dict(state["threshold"])


def _check_prefix(prefix_len: Any) -> None:
    if not isinstance(prefix_len, int) or isinstance(prefix_len, bool) or prefix_len < 1:
        raise ValueError(f"prefix_len={prefix_len!r}: must be an integer >= 1")


def target_from_metrics(path: str | os.PathLike[str], key: str = "kept_len_mean",
                        weight_key: str = "rollouts") -> float:
    """Mean kept length of a finished run, from its metrics.jsonl.

    Uses every line holding `key` (or a namespaced key ending in "/" + key), weighted by
    `weight_key` (same matching) when all those lines have it: the mean over rollouts.
    """

    def lookup(row: dict[str, Any], k: str) -> float | None:
        if k in row:
            return float(row[k])
        for name, value in row.items():
            if isinstance(name, str) and name.endswith("/" + k):
                return float(value)
        return None

    values: list[float] = []
    weights: list[float | None] = []
    with Path(path).open() as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            v = lookup(row, key)
            if v is not None and math.isfinite(v):
                values.append(v)
                weights.append(lookup(row, weight_key))
    if not values:
        raise ValueError(f"{path}: no finite {key!r} in any line")
    if all(w is not None and w > 0 for w in weights):
        total = sum(w for w in weights if w is not None)
        return sum(v * w for v, w in zip(values, weights, strict=True) if w is not None) / total
    return sum(values) / len(values)


def prior_from_run(run_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(lengths, ended_on_own) of the first recorded step of a run's trace store, or None.

    For `random` length-matched to a KAT run: in KAT's warm-up nothing is cut, so that step's
    rollouts show the natural lengths of the initial student, which `RandomPolicy` uses before
    its own first step. A rollout KAT stopped counts as censored at its generated length.
    """
    tdir = Path(run_dir) / "traces"
    if not tdir.is_dir() or not any(tdir.glob("*.parquet")):
        return None
    from kat_diag.traces.reader import TraceReader

    reader = TraceReader(tdir)
    steps = reader.read(["step"])["step"]
    if len(steps) == 0:
        return None
    first = int(np.min(steps))
    rows = reader.read(["gen_len", "stop_reason"], steps=(first, first))
    ended = np.asarray(rows["stop_reason"]).astype(str) != "policy"
    return np.asarray(rows["gen_len"], dtype=np.int64), ended


def make_policy(name: str, kat: KATConfig | None = None, prefix_len: int | None = None,
                random_target: float | str | os.PathLike[str] | None = None, seed: int = 0, *,
                device: str | torch.device = "cpu",
                gather: Callable[[np.ndarray], np.ndarray] | None = None) -> TerminationPolicy:
    """Build a termination policy by name: none | kat | random | prefix | kat+prefix.

    kat: KAT parameters (default KATConfig()) for kat and kat+prefix. prefix_len: P for prefix
    and kat+prefix. random_target: mean kept length for random, or the path of a KAT run's
    metrics.jsonl to match. seed: random's generator seed. Arguments a policy does not use are
    ignored, so one config can sweep policy names. gather: KAT's cross-rank buffer gather.
    """
    key = name.strip().lower().replace(" ", "")
    if key not in POLICY_NAMES:
        raise ValueError(f"unknown termination policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    if key in ("prefix", "kat+prefix") and prefix_len is None:
        raise ValueError(f"policy {key!r} needs prefix_len (the budget P)")
    if key == "random" and random_target is None:
        raise ValueError("policy 'random' needs random_target: a mean kept length, or a KAT run's "
                         "metrics.jsonl")
    if key == "none":
        return NonePolicy(device)
    if key == "prefix":
        assert prefix_len is not None
        return PrefixPolicy(prefix_len, device)
    if key == "random":
        target, prior = random_target, None
        if isinstance(target, (str, os.PathLike)):
            prior = prior_from_run(Path(target).parent)
            target = target_from_metrics(target)
        return RandomPolicy(float(target), seed, device, prior=prior)  # type: ignore[arg-type]
    cfg = kat if kat is not None else KATConfig()
    return KATPolicy(cfg, prefix_len if key == "kat+prefix" else None, device, gather=gather)
