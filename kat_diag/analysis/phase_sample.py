"""Per-token phases of stored rollouts, for the analyses that compare phases (gradients, vocabulary).

Gradient geometry and the teacher vocabulary shift both need the same thing from a trace store:
which tokens of each rollout are pre-agreement, agreement and post-agreement (docs/kat.md#phases), under the
run's own KAT parameters and the tau each rollout was recorded with (or one fixed tau for runs
where KAT was inactive, e.g. plain OPD). This module reads the run's config, resolves tau and labels
the tokens of one store batch with `kat_diag.kat.phases`, the detector code the online run used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import rollout_minima, threshold_of
from kat_diag.kat.phases import phase_labels, segment

CONFIG_FILES: tuple[str, ...] = ("config.json", "record_config.json")


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's resolved config: config.json (train), record_config.json (record), else the store's."""
    run = Path(run_dir)
    for name in CONFIG_FILES:
        if (run / name).exists():
            config = json.loads((run / name).read_text())
            if isinstance(config, dict) and "model_type" not in config:  # not a model saved into RUN (TRL)
                return config
    manifest = run / "traces" / "_manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text()).get("config") or {}
    return {}


def kat_config_of(config: dict[str, Any], **overrides: Any) -> KATConfig:
    """KATConfig from a run config's ``kat`` section (unknown keys ignored), non-None overrides applied."""
    names = set(KATConfig.__dataclass_fields__)
    section = config.get("kat") or {}
    values = {k: v for k, v in section.items() if k in names} if isinstance(section, dict) else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return KATConfig(**values)


def parse_tau(tau: str | float | None) -> float | str | None:
    """``"recorded"``/None -> None (use each rollout's recorded tau); ``"qX"`` -> kept as the string
    (resolved by `resolve_tau` on the store); else a finite float."""
    if tau is None or (isinstance(tau, str) and tau.strip().lower() == "recorded"):
        return None
    if isinstance(tau, str) and tau.strip().lower().startswith("q"):
        try:
            q = float(tau.strip()[1:])
        except ValueError as e:
            raise ValueError(f"--tau qX needs a quantile X in (0, 1), got {tau!r}") from e
        if not 0.0 < q < 1.0:
            raise ValueError(f"--tau qX needs a quantile X in (0, 1), got {tau!r}")
        return tau.strip().lower()
    try:
        value = float(tau)
    except ValueError as e:
        raise ValueError(f"--tau must be 'recorded', qX or a number, got {tau!r}") from e
    if not (math.isfinite(value) and value > 0):  # KL >= 0: no window is below a tau <= 0
        raise ValueError(f"--tau must be a finite number > 0, got {tau!r}")
    return value


def resolve_tau(tau: float | str | None, reader, window: int, steps: tuple[int | None, int | None] | None = None
                ) -> float | None:
    """A fixed tau, None (recorded), or for ``"qX"``: the X-quantile of the per-rollout minimum
    window means of the store (the paper's rule, s = Q_{1-eta}, over every analysed rollout at once)."""
    if not isinstance(tau, str):
        return tau
    q = float(tau[1:])
    mins = [rollout_minima(b["kl"].values, b["kl"].offsets, window)
            for b in reader.iter_batches(["kl"], steps=steps)]
    values = np.concatenate(mins) if mins else np.zeros(0)
    values = values[np.isfinite(values)]
    if not len(values):
        raise ValueError(f"--tau {tau}: no rollout of {reader.dir} is at least one window ({window} tokens) long")
    return threshold_of(values, KATConfig(window=window, tau_quantile=q, min_fill=1))  # exact, as online


def rollout_tau(recorded_R: np.ndarray, fixed: float | None) -> np.ndarray:
    """tau per rollout: the recorded one (NaN where KAT was inactive) or the fixed override."""
    recorded = np.asarray(recorded_R, dtype=np.float64)
    return recorded if fixed is None else np.full(recorded.shape, fixed)


def label_tokens(kl_values: np.ndarray, offsets: np.ndarray, tau_R: np.ndarray, cfg: KATConfig) -> np.ndarray:
    """Per-token phase (int8: 0 pre, 1 agreement, 2 post; -1 in rollouts whose tau is not finite:
    without a threshold no phase is defined, so those rollouts are left out rather than called pre)."""
    offs = np.asarray(offsets, dtype=np.int64)
    tau_R = np.asarray(tau_R, dtype=np.float64)
    ph = segment(np.asarray(kl_values), offs, cfg, tau_R)
    labels = phase_labels(offs, ph.pre_end, ph.agree_end)
    undefined_N = np.repeat(~np.isfinite(tau_R), np.diff(offs))
    labels[undefined_N] = -1
    return labels
