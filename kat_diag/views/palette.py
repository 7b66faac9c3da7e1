"""The one palette of kat-diag: every colour a figure, the HTML page or the terminal shows.

Why it exists: a reader moves between the heatmap, the phase plots, `inspect` in a terminal and the
HTML page of a rollout. A colour must mean the same thing in all of them (orange is the agreement
phase everywhere, vermillion a wrong answer everywhere), and the KL colour scale must be the same
scale. So the colours live here, as plain data, and nowhere else: `kat_diag.analysis.style` builds
the matplotlib objects from them, `kat_diag.views.colors` the terminal and HTML colours. A test
checks that no other module of kat_diag/ or cli/ holds a colour literal.

Layout: the categorical colours (phases, verdicts, methods, marks, page ink), then the KL colour
map as sampled RGB stops. No matplotlib here: the views must render without it. The stops are
matplotlib's ``viridis_r`` sampled at 33 equally spaced points (a test compares them with
matplotlib's), so piecewise-linear interpolation is within 3/255 of the real map.

Choices:
* Categorical colours are the Okabe-Ito set (distinguishable with the common colour-vision
  deficiencies); phases and verdicts never share a hue.
* KL: perceptually uniform (viridis), reversed so that LOW KL - agreement, the signal of the trap -
  is the bright, saturated end (yellow). It stands out on a black terminal and on a white page;
  high-KL spikes are dark purple. Lightness is monotone, so the scale survives greyscale printing.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------
# Categories

PHASE_COLORS: dict[str, str] = {"pre": "#0072B2", "agreement": "#E69F00", "post": "#CC79A7"}

# Verdicts of a rollout (kat_diag.world.truth, plus what real data can say). "unfinished": no final
# answer - the budget ran out or a termination policy cut the rollout.
VERDICT_COLORS: dict[str, str] = {
    "right": "#009E73", "wrong": "#D55E00", "loop": "#56B4E9", "unfinished": "#8C8C8C", "ungraded": "#D9D9D9",
}
VERDICT_LABELS: dict[str, str] = {
    "right": "right", "wrong": "wrong answer", "loop": "repetition loop", "unfinished": "no answer (cut or budget)",
    "ungraded": "not graded",
}
VERDICTS: tuple[str, ...] = tuple(VERDICT_COLORS)

# Training methods (termination policies and losses) in curves and the study figure.
METHOD_COLORS: dict[str, str] = {
    "none": "#4D4D4D", "kat": "#EE7733", "random": "#0077BB", "prefix": "#009988", "kat+prefix": "#AA3377",
    "iw-opd": "#33BBEE", "iw_opd": "#33BBEE", "iwopd": "#33BBEE", "kat+iwopd": "#CCBB44",
}
EXTRA_COLORS: tuple[str, ...] = ("#4D4D4D", "#EE7733", "#0077BB", "#009988", "#AA3377", "#33BBEE", "#CCBB44",
                                 "#882255")  # runs without a known method, in order

# Detectors of the trap sweep (kat_diag.analysis.sweep): KAT in its method colour, the references apart.
DETECTOR_COLORS: dict[str, str] = {
    "kl": "#EE7733", "student_entropy": "#0077BB", "teacher_entropy": "#AA3377", "ngram": "#009988",
    "length": "#8C8C8C",
}

# Marks on KL pictures (onset, fire, ground truth) and neutral reference lines.
MARK_COLORS: dict[str, str] = {
    "onset": "#000000", "fire": "#000000", "outline": "#FFFFFF", "first_error": "#D55E00", "loop_start": "#56B4E9",
    "tau": "#000000", "reference": "#555555", "random": "#8C8C8C", "cut": "#000000",
}

# The page: text, muted text, grid, the no-data background of a heatmap, non-finite KL.
INK = "#222222"
MUTED = "#666666"
GRID = "#B0B0B0"
NO_DATA = "#F4F4F4"
NONFINITE = "#9E9E9E"
PAPER = "#FFFFFF"
WARNING = "#B00020"  # captions that qualify a figure (KL from a sampled estimator, not the full KL)
CUT_SHADE = "#000000"  # drawn translucent / hatched over tokens that were generated but not trained on

# --------------------------------------------------------------------------------------------------
# The KL colour map

KL_CMAP_SOURCE = "viridis_r"  # what the stops sample (tests/test_palette.py compares)
KL_RANGE: tuple[float, float] = (1e-3, 10.0)  # nats, log scale; fixed so rollouts, stages and runs compare
KL_STOPS: tuple[tuple[int, int, int], ...] = (
    (253, 231, 37), (234, 229, 26), (213, 226, 26), (192, 223, 37), (170, 220, 50), (149, 216, 64),
    (129, 211, 77), (110, 206, 88), (92, 200, 99), (76, 194, 108), (61, 188, 116), (49, 181, 123),
    (39, 173, 129), (33, 166, 133), (31, 159, 136), (31, 151, 139), (33, 144, 141), (35, 136, 142),
    (38, 129, 142), (41, 121, 142), (44, 113, 142), (48, 106, 142), (51, 98, 141), (55, 90, 140),
    (59, 81, 139), (63, 72, 137), (66, 63, 133), (69, 53, 129), (71, 44, 122), (72, 33, 115),
    (72, 23, 105), (70, 11, 94), (68, 1, 84),
)


def hex_rgb(color: str) -> tuple[int, int, int]:
    """#RRGGBB -> (r, g, b) in 0..255."""
    c = color.lstrip("#")
    if len(c) != 6:
        raise ValueError(f"expected #RRGGBB, got {color!r}")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgb_hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(max(0, min(255, int(round(v)))) for v in rgb))


def method_color(name: str, i: int = 0) -> str:
    """The colour of a run: its method's when the name is one (e.g. `kat`, `fig_kat`, `seed0/kat`),
    else the i-th extra colour."""
    key = str(name).lower()
    for m in sorted(METHOD_COLORS, key=len, reverse=True):  # "kat+prefix" before "kat"
        if key == m or key.endswith(("/" + m, "_" + m, "-" + m)):
            return METHOD_COLORS[m]
    if key.endswith(("opd", "none")):
        return METHOD_COLORS["none"]
    return EXTRA_COLORS[i % len(EXTRA_COLORS)]
