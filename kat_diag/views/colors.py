"""KL as colour: one log scale (1e-3..10 nats, fixed so rollouts and runs compare) for terminal and HTML."""

from __future__ import annotations

import math

import numpy as np

# Colour ramp from the xterm 256-colour cube: blue -> cyan -> green -> yellow -> red.
ANSI_RAMP: tuple[int, ...] = (
    17, 18, 19, 20, 21, 27, 33, 39, 45, 51, 50, 49, 48, 47, 46, 82, 118, 154, 190, 226, 220, 214,
    208, 202, 196,
)

ANSI_NONFINITE = 244  # grey

DEFAULT_KL_RANGE = (1e-3, 10.0)  # nats; fixed so colours compare across rollouts and runs

_CUBE_LEVELS = (0, 95, 135, 175, 215, 255)


# --------------------------------------------------------------------------------------------------
# One rollout


def kl_level(kl: np.ndarray, lo: float = DEFAULT_KL_RANGE[0], hi: float = DEFAULT_KL_RANGE[1]) -> np.ndarray:
    """Position of each KL value on the log colour scale, in [0, 1]; NaN where KL is not finite."""
    kl = np.asarray(kl, dtype=np.float64)
    out = np.full(kl.shape, np.nan)
    ok = np.isfinite(kl)
    clipped = np.clip(kl[ok], lo, hi)  # KL <= lo (incl. 0 and tiny negatives) maps to the bottom
    out[ok] = (np.log(clipped) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return out


def _ansi_index(level: float) -> int:
    if math.isnan(level):
        return ANSI_NONFINITE
    return ANSI_RAMP[min(len(ANSI_RAMP) - 1, int(level * len(ANSI_RAMP)))]


def ansi_rgb(index: int) -> tuple[int, int, int]:
    """RGB of an xterm 256-colour index (cube 16-231 and grey ramp 232-255), for the HTML page."""
    if 16 <= index <= 231:
        i = index - 16
        return _CUBE_LEVELS[i // 36], _CUBE_LEVELS[(i // 6) % 6], _CUBE_LEVELS[i % 6]
    if index >= 232:
        g = 8 + 10 * (index - 232)
        return g, g, g
    basic = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
             (192, 192, 192), (128, 128, 128), (255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255),
             (255, 0, 255), (0, 255, 255), (255, 255, 255)]
    return basic[index]


def _hex(index: int) -> str:
    r, g, b = ansi_rgb(index)
    return f"#{r:02x}{g:02x}{b:02x}"


def _dark(index: int) -> bool:
    r, g, b = ansi_rgb(index)
    return 0.299 * r + 0.587 * g + 0.114 * b < 140
