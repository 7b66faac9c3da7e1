"""KAT's parameters: `KATConfig`, the paper's and the world's presets, and old config keys.

Everything that describes a KAT setting and nothing that runs it, so configs, CLI preflight and run
config files can name KAT parameters without importing torch. Symbols: W window, T persistence, L0
exempt length, K warm-up steps, B buffer capacity, B_min minimum fill, tau quantile (1 - eta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_WINDOW = 4096  # keeps window sums and poison values inside int64 with room for long chunks


_KEEP_MODES = ("onset", "fire")

STATISTICS = ("rollout_min", "windows")


@dataclass(frozen=True)
class KATConfig:
    """KAT parameters (docs/kat.md). See docs/kat.md "Parameters" for what each trades off.

    The defaults are the embedded world's preset (`KAT_PRESETS["world"]`) under the paper's rule.
    """

    window: int = 16  # W: tokens per window mean
    persistence: int = 8  # T: consecutive low windows needed to fire
    min_length: int = 32  # L0: never fire before this many tokens have been seen
    warmup_steps: int = 5  # K: training steps during which KAT only fills its buffer
    buffer_size: int = 4096  # B: FIFO capacity, in buffer values
    min_fill: int = 64  # B_min: KAT stays inactive until the buffer holds this many values
    tau_quantile: float = 0.7  # tau = this quantile of the buffer (paper: 1 - eta = 0.7)
    statistic: str = "rollout_min"  # what a rollout pushes: its minimum window mean | its stride windows
    keep: str = "onset"  # train on [0, onset) ("onset") or [0, fire] ("fire")

    def __post_init__(self) -> None:
        def check(name: str, value: Any, ok: bool, rule: str) -> None:
            if not ok:
                raise ValueError(f"KATConfig.{name}={value!r}: must be {rule}")

        for name in ("window", "persistence", "min_length", "warmup_steps", "buffer_size", "min_fill"):
            value = getattr(self, name)
            is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            check(name, value, is_int, "an integer")
        check("window", self.window, 1 <= self.window <= MAX_WINDOW, f"in [1, {MAX_WINDOW}]")
        check("persistence", self.persistence, self.persistence >= 1, ">= 1")
        check("min_length", self.min_length, self.min_length >= 0, ">= 0")
        check("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        check("buffer_size", self.buffer_size, self.buffer_size >= 1, ">= 1")
        check("min_fill", self.min_fill, 1 <= self.min_fill <= self.buffer_size,
              f"in [1, buffer_size={self.buffer_size}] (B_min <= B)")
        q = self.tau_quantile
        is_real = isinstance(q, (int, float, np.floating)) and not isinstance(q, bool)
        check("tau_quantile", q, is_real and math.isfinite(q) and 0.0 < q < 1.0,
              "a number in the open interval (0, 1) (the paper's eta 0.3 is tau_quantile 0.7)")
        check("statistic", self.statistic, self.statistic in STATISTICS, f"one of {STATISTICS}")
        check("keep", self.keep, self.keep in _KEEP_MODES, f"one of {_KEEP_MODES}")

    @property
    def fire_lag(self) -> int:
        """fire - onset for every fired rollout (= T + W - 2)."""
        return self.persistence + self.window - 2

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @staticmethod
    def upgrade_dict(d: dict[str, Any]) -> dict[str, Any]:
        """Old keys mapped to today's (`upgrade_kat_dict`); config files call it through `config_io`."""
        return upgrade_kat_dict(d)


# Paper values as quoted in docs/kat.md (W 64, B 4096, B_min 512, K 50, T 4, eta 0.3). L0 is not
# quoted; 128 (two windows) is our choice. The world preset was chosen by measurement on the
# embedded world (docs/kat.md "Parameters").
KAT_PRESETS: dict[str, KATConfig] = {
    "paper": KATConfig(window=64, persistence=4, min_length=128, warmup_steps=50, buffer_size=4096,
                       min_fill=512, tau_quantile=0.7, statistic="rollout_min"),
    "world": KATConfig(),
}


def kat_preset(name: str, **overrides: Any) -> KATConfig:
    """The preset `name` ("paper" | "world") with the given fields overridden (None = keep)."""
    if name not in KAT_PRESETS:
        raise ValueError(f"unknown KAT preset {name!r}; choose one of {', '.join(KAT_PRESETS)}")
    base = KAT_PRESETS[name].to_dict()
    base.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(base) - set(KATConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown KAT parameter(s) {unknown}")
    return KATConfig(**base)


# Old config files name the quantile `quantile` (tau = quantile_eta of stride-window means).
_LEGACY_KEYS = {"quantile": "tau_quantile"}


def upgrade_kat_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A "kat" config section with the keys of configs written before the paper's rule mapped to
    today's: `quantile` -> `tau_quantile`, and then (old behaviour) the `windows` statistic, B_min 1."""
    d = dict(d)
    legacy = "quantile" in d and "tau_quantile" not in d
    for old, new in _LEGACY_KEYS.items():
        if old in d:
            d[new] = d.pop(old)
    if legacy:
        d.setdefault("statistic", "windows")
        d.setdefault("min_fill", 1)
    return d


def kat_config_from_dict(d: dict[str, Any]) -> KATConfig:
    """KATConfig from a run's config.json "kat" entry (old key names mapped: `upgrade_kat_dict`)."""
    d = upgrade_kat_dict(d)
    unknown = sorted(set(d) - set(KATConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown KAT parameter(s) {unknown} in config")
    return KATConfig(**d)
