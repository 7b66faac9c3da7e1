"""One matplotlib style for every kat-diag figure (Agg backend: no display needed).

Figures from different analyses end up side by side in `figures/` and the README, so they share
fonts, sizes, the KL colour map and the colours of phases, outcomes and stages. Import this module
before pyplot: it selects the non-interactive Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

KL_CMAP = "magma"  # dark = agreement (low KL), bright = disagreement
KL_RANGE = (1e-3, 10.0)  # nats; fixed so heatmaps compare across stages and runs
PHASE_COLORS = {"pre": "#4C72B0", "agreement": "#DD8452", "post": "#8C8C8C"}
OUTCOME_COLORS = {"right": "#2CA02C", "wrong": "#D62728", "ungraded": "#7F7F7F"}
STAGE_STYLES = {"early": {"linestyle": "--", "alpha": 0.85}, "late": {"linestyle": "-", "alpha": 1.0},
                "all": {"linestyle": "-", "alpha": 1.0}}
DPI = 110

_RC: dict[str, Any] = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 12,
    "figure.titleweight": "bold",
    "font.family": "DejaVu Sans",
}


def apply() -> None:
    """Set the shared rcParams (idempotent)."""
    plt.rcParams.update(_RC)


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (10.0, 6.0), **kwargs: Any) -> Any:
    """A new figure and axes grid in the shared style: ``(fig, axes)`` as ``plt.subplots`` returns."""
    apply()
    return plt.subplots(nrows, ncols, figsize=size, **kwargs)


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG (tight bounding box) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # layouts are set by the plots; a tight bbox would draw twice
    plt.close(fig)
    return path
