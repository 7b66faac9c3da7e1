"""KL as colour for the terminal and the HTML page: the palette's KL scale on a log axis.

One scale everywhere (`kat_diag.views.palette.KL_STOPS`, 1e-3..10 nats, fixed so rollouts and runs
compare), in three encodings: RGB for HTML and truecolor terminals, the nearest xterm-256 colour
for other terminals, and a glyph per level (``▁▂▃▄▅▆▇█``) for output without colour, so KL stays
readable with ``--no-color``. `tau_level` places a threshold on the same axis so every KL legend
can mark it.
"""

from __future__ import annotations

import math
import os

import numpy as np

from kat_diag.views.palette import INK, KL_RANGE, KL_STOPS, NONFINITE, PAPER, hex_rgb, rgb_hex

DEFAULT_KL_RANGE = KL_RANGE
GLYPHS = "▁▂▃▄▅▆▇█"  # low -> high KL in --no-color output
ANSI_LEVELS = 24  # colours of the 256-colour legend / terminal scale
_CUBE_LEVELS = (0, 95, 135, 175, 215, 255)
_STOPS = np.asarray(KL_STOPS, dtype=np.float64)


def kl_level(kl: np.ndarray, lo: float = DEFAULT_KL_RANGE[0], hi: float = DEFAULT_KL_RANGE[1]) -> np.ndarray:
    """Position of each KL value on the log colour scale, in [0, 1]; NaN where KL is not finite."""
    kl = np.asarray(kl, dtype=np.float64)
    out = np.full(kl.shape, np.nan)
    ok = np.isfinite(kl)
    clipped = np.clip(kl[ok], lo, hi)  # KL <= lo (incl. 0 and tiny negatives) maps to the bottom
    out[ok] = (np.log(clipped) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return out


def tau_level(tau: float | None, lo: float = DEFAULT_KL_RANGE[0], hi: float = DEFAULT_KL_RANGE[1]) -> float | None:
    """Where tau sits on the KL scale (0..1), None when tau is undefined."""
    if tau is None or not math.isfinite(float(tau)) or tau <= 0:
        return None
    return float(kl_level(np.array([float(tau)]), lo, hi)[0])


def level_rgb(level: float) -> tuple[int, int, int]:
    """RGB of a scale position (linear between the palette's stops); NONFINITE for NaN."""
    if level is None or not math.isfinite(level):
        return hex_rgb(NONFINITE)
    x = min(max(float(level), 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(x), len(_STOPS) - 2)
    f = x - i
    c = _STOPS[i] * (1 - f) + _STOPS[i + 1] * f
    return int(round(c[0])), int(round(c[1])), int(round(c[2]))


def level_hex(level: float) -> str:
    return rgb_hex(level_rgb(level))


def ansi_rgb(index: int) -> tuple[int, int, int]:
    """RGB of an xterm 256-colour index (cube 16-231 and grey ramp 232-255)."""
    if 16 <= index <= 231:
        i = index - 16
        return _CUBE_LEVELS[i // 36], _CUBE_LEVELS[(i // 6) % 6], _CUBE_LEVELS[i % 6]
    if index >= 232:
        g = 8 + 10 * (index - 232)
        return g, g, g
    raise ValueError(f"index {index}: the 16 basic colours depend on the terminal's theme")


def xterm_index(rgb: tuple[int, int, int]) -> int:
    """The xterm-256 colour (cube or grey ramp, never the theme-dependent 0-15) nearest to rgb."""
    target = np.asarray(rgb, dtype=np.float64)
    best, best_d = 16, math.inf
    for idx in range(16, 256):
        d = float(((np.asarray(ansi_rgb(idx)) - target) ** 2).sum())
        if d < best_d:
            best, best_d = idx, d
    return best


ANSI_RAMP: tuple[int, ...] = tuple(xterm_index(level_rgb(i / (ANSI_LEVELS - 1))) for i in range(ANSI_LEVELS))
ANSI_NONFINITE = xterm_index(hex_rgb(NONFINITE))


def ansi_index(level: float) -> int:
    """The 256-colour index of a scale position (ANSI_NONFINITE for NaN)."""
    if level is None or not math.isfinite(level):
        return ANSI_NONFINITE
    return ANSI_RAMP[min(ANSI_LEVELS - 1, int(round(float(level) * (ANSI_LEVELS - 1))))]


def dark(rgb: tuple[int, int, int]) -> bool:
    """Whether white text reads better than black on this background (luma below the middle)."""
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b < 140


def glyph(level: float) -> str:
    """One character for a scale position: ▁ (low KL) .. █ (high); '?' for non-finite."""
    if level is None or not math.isfinite(level):
        return "?"
    return GLYPHS[min(len(GLYPHS) - 1, int(float(level) * len(GLYPHS)))]


def color_depth(env: dict[str, str] | None = None) -> str:
    """'truecolor' when the terminal says it has 24-bit colour (COLORTERM), else '256'."""
    env = os.environ if env is None else env
    return "truecolor" if env.get("COLORTERM", "").lower() in ("truecolor", "24bit") else "256"


def ansi_params(level: float, depth: str = "256", background: bool = True) -> str:
    """SGR parameters that paint a scale position, e.g. '48;5;226' or '48;2;253;231;37'."""
    layer = 48 if background else 38
    if depth == "truecolor":
        r, g, b = level_rgb(level)
        return f"{layer};2;{r};{g};{b}"
    if depth != "256":
        raise ValueError(f"color depth must be 256 or truecolor, got {depth!r}")
    return f"{layer};5;{ansi_index(level)}"


def contrast_params(level: float, depth: str = "256") -> str:
    """Foreground (black or white) that reads on the background of this scale position."""
    rgb = level_rgb(level) if depth == "truecolor" else ansi_rgb(ansi_index(level))
    return ansi_color(PAPER if dark(rgb) else INK, depth)


def legend_levels(n: int = ANSI_LEVELS) -> list[float]:
    """Equally spaced scale positions for a legend strip."""
    return [i / (n - 1) for i in range(n)]


def tau_cell(tau: float | None, n: int = ANSI_LEVELS, lo: float = DEFAULT_KL_RANGE[0],
             hi: float = DEFAULT_KL_RANGE[1]) -> int | None:
    """Which of n legend cells holds tau (None when undefined)."""
    t = tau_level(tau, lo, hi)
    return None if t is None else min(n - 1, int(round(t * (n - 1))))


def ansi_color(color: str, depth: str = "256", background: bool = False) -> str:
    """SGR parameters for a palette colour (#RRGGBB): exact in truecolor, nearest xterm-256 otherwise."""
    layer = 48 if background else 38
    rgb = hex_rgb(color)
    if depth == "truecolor":
        return f"{layer};2;{rgb[0]};{rgb[1]};{rgb[2]}"
    return f"{layer};5;{xterm_index(rgb)}"
