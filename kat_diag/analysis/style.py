"""The matplotlib side of the palette: one style for every kat-diag figure (Agg backend).

Figures from different analyses end up side by side in `figures/`, the docs and a paper, so they
share fonts, sizes and the colours of `kat_diag.views.palette` (phases, verdicts, methods, marks,
the KL colour map - the same ones the terminal and HTML views use). Import this module before
pyplot: it selects the non-interactive Agg backend.

Sizes: figures are drawn at a paper's full text width (7 in) or column width (3.4 in), with fonts
of 7-9 pt, so they stay readable when a PNG is shrunk into a column. ``set_mode("paper")`` (the
`figures --paper` option) writes 300-dpi PNGs and a vector PDF next to each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, LogNorm  # noqa: E402

from kat_diag.views.palette import (  # noqa: E402  (re-exported: figures import their colours from here)
    CUT_SHADE,
    EXTRA_COLORS,
    GRID,
    INK,
    KL_RANGE,
    KL_STOPS,
    MARK_COLORS,
    METHOD_COLORS,
    MUTED,
    NO_DATA,
    PAPER,
    PHASE_COLORS,
    VERDICT_COLORS,
    VERDICT_LABELS,
    VERDICTS,
    method_color,
)

__all__ = ["CUT_SHADE", "EXTRA_COLORS", "GRID", "INK", "KL_RANGE", "MARK_COLORS", "METHOD_COLORS", "MUTED", "NO_DATA",
           "PAPER", "PHASE_COLORS", "VERDICT_COLORS", "VERDICT_LABELS", "VERDICTS", "method_color", "kl_cmap",
           "kl_norm", "mark_tau", "outline", "figure", "save", "set_mode", "TEXT_WIDTH", "COLUMN_WIDTH", "no_panel",
           "apply", "STAGE_STYLES", "STAGE_MARKERS"]

TEXT_WIDTH = 7.0  # inches: a two-column paper's text width
COLUMN_WIDTH = 3.4  # inches: one column
STAGE_STYLES = {"early": {"linestyle": "--", "alpha": 0.9}, "late": {"linestyle": "-", "alpha": 1.0},
                "all": {"linestyle": "-", "alpha": 1.0}}
STAGE_MARKERS = {"early": "o", "late": "s", "all": "D"}
_MODE = {"name": "screen", "dpi": 200}

_RC: dict[str, Any] = {
    "figure.facecolor": PAPER,
    "axes.facecolor": PAPER,
    "axes.edgecolor": INK,
    "axes.labelcolor": INK,
    "text.color": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "axes.grid": True,
    "grid.color": GRID,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 8.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "legend.handlelength": 1.6,
    "figure.titlesize": 9.5,
    "figure.titleweight": "bold",
    "font.family": "DejaVu Sans",
    "lines.linewidth": 1.3,
    "lines.markersize": 4,
    "savefig.facecolor": PAPER,
}


def set_mode(name: str) -> None:
    """'screen' (200-dpi PNG) or 'paper' (300-dpi PNG plus a PDF next to it)."""
    if name not in ("screen", "paper"):
        raise ValueError(f"figure mode must be screen or paper, got {name!r}")
    _MODE.update(name=name, dpi=300 if name == "paper" else 200)


def apply() -> None:
    """Set the shared rcParams (idempotent)."""
    plt.rcParams.update(_RC)


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (TEXT_WIDTH, 4.0), **kwargs: Any) -> Any:
    """A new figure and axes grid in the shared style: ``(fig, axes)`` as ``plt.subplots`` returns."""
    apply()
    return plt.subplots(nrows, ncols, figsize=size, **kwargs)


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG (and PDF in paper mode) and close it; returns the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_MODE["dpi"])  # layouts are set by the plots; a tight bbox would draw twice
    if _MODE["name"] == "paper":
        fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path


def kl_cmap() -> Any:
    """The palette's KL colour map (low KL bright), NO_DATA for masked cells (past a rollout's end)."""
    stops = [tuple(c / 255 for c in rgb) for rgb in KL_STOPS]
    return LinearSegmentedColormap.from_list("kat_kl", stops, N=256).with_extremes(bad=NO_DATA)


def kl_norm(kl_range: tuple[float, float] | None = None) -> Any:
    lo, hi = kl_range or KL_RANGE
    return LogNorm(lo, hi)


def outline(width: float = 1.6) -> list[Any]:
    """Path effects that draw a mark with a white halo, so it reads on any KL colour and on padding."""
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=width, foreground=MARK_COLORS["outline"])]


def mark_tau(colorbar: Any, tau: float | None, label: str = "tau") -> str:
    """Mark tau on a KL colour bar: a line across it with a triangle at its left edge. Returns the
    text to add to the bar's label ('' when tau is undefined)."""
    if tau is None or not tau == tau or tau <= 0:
        return ""
    ax = colorbar.ax
    ax.axhline(tau, color=MARK_COLORS["tau"], linewidth=1.6)
    ax.axhline(tau, color=MARK_COLORS["outline"], linewidth=0.5)
    ax.plot([-0.15], [tau], marker=">", color=MARK_COLORS["tau"], markersize=5, clip_on=False,
            transform=ax.get_yaxis_transform())
    return f"; ▶ {label} {tau:.2g}"


def no_panel(ax: Any, message: str) -> None:
    """An axes that says why it holds no plot (e.g. an artefact of the policy), instead of a plot."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=MUTED, fontsize=7,
            wrap=True)
