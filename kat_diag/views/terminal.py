"""One rollout in a terminal: why it was (or was not) cut, then its tokens coloured by reverse KL.

Layout, top to bottom:
1. the header (ids, step/index address, tau, onset/fire, verdict, the student's answer);
2. the KL legend (the palette's scale, 256-colour or truecolor, tau marked on it; without colour:
   the glyph scale ``▁..█`` with its bounds);
3. the *window track*, one column per token, in chunks of ``width`` tokens: token, KL, window mean
   z_t, low windows (z_t < tau), the persistence count, the token's rank under the teacher, and
   the marks L0 / first error / loop start / onset / fire / kept end, with their positions listed;
4. the departures table: tokens that are not the teacher's top-1, with p_T, rank and the teacher's
   alternatives (what HTML shows on hover, here in plain text);
5. the tokens with their KL colours and ⟦marks⟧ (``|`` separators, ``¦`` after cut tokens
   without colour).

Every string from the store goes through ``_printable``: ANSI escape sequences and other control
characters in it are shown as ``\\xNN``, never sent raw.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kat_diag.views.colors import (
    ANSI_LEVELS,
    DEFAULT_KL_RANGE,
    GLYPHS,
    ansi_color,
    ansi_params,
    contrast_params,
    glyph,
    kl_level,
    legend_levels,
    tau_cell,
)
from kat_diag.views.palette import MARK_COLORS, PHASE_COLORS
from kat_diag.views.rollout import _header, id_namer, rollout_marks, token_strings
from kat_diag.views.text import _printable
from kat_diag.views.track import MARK_GLYPHS, MARK_NAMES, MARK_ORDER, Track, departures, teacher_ranks

RESET = "\x1b[0m"
LABEL = 8  # width of the track's row labels


def _cell_char(text: str) -> str:
    """One printable character standing for a token in the track."""
    if text == "":
        return "∅"
    if text[0] == "\n":
        return "↵"
    if text[0] == " ":
        return "·"
    p = _printable(text[0])
    return p[0] if len(p) == 1 else "?"


def _sgr(params: str, text: str, color: bool) -> str:
    return f"\x1b[{params}m{text}{RESET}" if color and params else text


def kl_legend(tau: float | None, kl_range: tuple[float, float], color: bool, depth: str) -> list[str]:
    """The KL scale with tau marked: a colour strip (or the glyph bounds without colour)."""
    lo, hi = kl_range
    cell = tau_cell(tau, ANSI_LEVELS, lo, hi)
    tau_txt = "undefined" if cell is None else f"{tau:.4g} nats"
    if color:
        strip = "".join(_sgr(ansi_params(lv, depth), " ", True) for lv in legend_levels())
        head = f"KL (log scale, low = agreement) {lo:g} "
        lines = [f"{head}{strip} {hi:g} nats   struck: cut (generated, not trained on)"]
        if cell is not None:
            lines.append(" " * (len(head) + cell) + f"▲ tau {tau_txt}")
        else:
            lines.append(f"tau {tau_txt}")
        return lines
    bounds = np.exp(np.linspace(math.log(lo), math.log(hi), len(GLYPHS) + 1))[1:-1]
    scale = " ".join(f"{g}<{b:.2g}" for g, b in zip(GLYPHS, bounds, strict=False)) + f" {GLYPHS[-1]}>={bounds[-1]:.2g}"
    tau_glyph = ""
    if tau is not None and math.isfinite(tau):
        tau_glyph = f" = {glyph(float(kl_level(np.array([tau]), lo, hi)[0]))}"
    return [f"KL glyphs (nats, log scale): {scale}; tau {tau_txt}{tau_glyph}",
            "tokens: kept tok| ... cut tok¦ (cut: generated but not trained on)"]


def render_track(track: Track, strings: list[str] | None, ranks: np.ndarray | None, *, color: bool,
                 depth: str = "256", width: int = 64, kl_range: tuple[float, float] = DEFAULT_KL_RANGE) -> list[str]:
    """The window track in chunks of ``width`` tokens (see the module docstring)."""
    n = track.kl.shape[0]
    lo, hi = kl_range
    kl_lv = kl_level(track.kl, lo, hi)
    z_lv = kl_level(track.z, lo, hi)
    chars = [_cell_char(s) for s in strings] if strings is not None else ["?"] * n
    # two rows of marks: the ground truth (first error, loop start) and KAT's (L0, onset, fire, kept end);
    # in a shared cell the later name wins (all are listed with their positions above the track)
    truth_at: dict[int, str] = {}
    kat_at: dict[int, str] = {}
    for name in ("kept_end", "L0", "onset", "fire", "loop_start", "first_error"):
        if name in track.marks and track.marks[name] < n:
            (truth_at if name in ("first_error", "loop_start") else kat_at)[track.marks[name]] = MARK_GLYPHS[name]
    low_params = "1;" + ansi_color(PHASE_COLORS["agreement"], depth)  # bold orange squares
    mark_params = ansi_color(MARK_COLORS["first_error"], depth)
    T = track.persistence
    lines: list[str] = []
    for c0 in range(0, max(n, 1), width):
        idx = range(c0, min(n, c0 + width))
        cells = [" "] * len(idx)
        for t in idx:
            if t % 10 == 0:
                for j, ch in enumerate(str(t)):
                    if t - c0 + j < len(cells):
                        cells[t - c0 + j] = ch
        ruler = "".join(cells)
        rows: list[tuple[str, str]] = [("pos", ruler), ("token", "".join(chars[t] for t in idx))]
        kl_row, z_row, low_row, cnt_row, rank_row, kat_row, truth_row = [], [], [], [], [], [], []
        for t in idx:
            g = glyph(float(kl_lv[t]))
            kl_row.append(_sgr(f"{ansi_params(float(kl_lv[t]), depth)};{contrast_params(float(kl_lv[t]), depth)}",
                               g, color))
            if math.isnan(track.z[t]):
                z_row.append(" ")
                low_row.append(" ")
            else:
                zg = glyph(float(z_lv[t]))
                z_row.append(_sgr(f"{ansi_params(float(z_lv[t]), depth)};{contrast_params(float(z_lv[t]), depth)}",
                                  zg, color))
                low_row.append(_sgr(low_params, "■", color) if track.low[t] else "·")
            k = int(track.count[t])
            cnt = "·" if k == 0 else (str(k) if k < 10 else "+")
            cnt_row.append(_sgr("1", cnt, color) if k >= T else cnt)
            if ranks is None:
                rank_row.append(" ")
            else:
                r = int(ranks[t])
                rank_row.append("·" if r == 1 else ("×" if r == 0 else str(min(r, 9))))
            m = kat_at.get(t, " ")
            kat_row.append(_sgr("1", m, color) if m != " " else " ")
            m = truth_at.get(t, " ")
            truth_row.append(_sgr(f"1;{mark_params}", m, color) if m != " " else " ")
        rows += [("KL", "".join(kl_row)), ("window", "".join(z_row)), ("< tau", "".join(low_row)),
                 (f"count/{T}", "".join(cnt_row))]
        if ranks is not None:
            rows.append(("T rank", "".join(rank_row)))
        rows += [("KAT", "".join(kat_row)), ("truth", "".join(truth_row))]
        lines += [f"{label:>{LABEL - 1}} {body}" for label, body in rows] + [""]
    return lines


def track_summary(track: Track) -> list[str]:
    """The numbers behind the track: tau, W/T/L0, the minimum window mean, every mark's position."""
    tau = "undefined (KAT inactive for this rollout; pass --tau)" if track.tau is None else (
        f"{track.tau:.4g} nats ({track.tau_source})")
    mw = track.min_window
    out = [f"tau {tau}; W={track.window} T={track.persistence} L0={track.min_length}; "
           f"min window mean {'-' if math.isnan(mw) else f'{mw:.4g}'}"
           + ("" if math.isnan(mw) else f" at t={track.min_window_at}")
           + ("" if track.tau is None or math.isnan(mw) else
              (" (below tau)" if mw < track.tau else " (never below tau)"))]
    parts = []
    for name in MARK_ORDER:
        pos = track.marks.get(name)
        parts.append(f"{MARK_GLYPHS[name]} {MARK_NAMES[name]} {'-' if pos is None else pos}")
    out.append("marks: " + "  ".join(parts))
    out.append(f"(■: window mean < tau; count: consecutive low windows, fires at {track.persistence} after L0; "
               "T rank: · teacher's top-1, 2-9 its rank, × outside its top-n)")
    if track.first_error == -2:
        out.append("ground truth: none in this store (first error / loop start need the embedded world)")
    return out


def departures_table(row: dict[str, Any], strings: list[str] | None, tokenizer: Any = None, limit: int = 15
                     ) -> list[str]:
    """Tokens that left the teacher's top-1: position, token, p_T, rank, the teacher's alternatives."""
    deps = departures(row, strings, id_namer(row, tokenizer))
    ranks = teacher_ranks(row)
    if ranks is None:
        return ["teacher alternatives: not stored (no teacher_top_ids)"]
    n = len(row["token_ids"])
    lines = [f"left the teacher's top-1 at {len(deps)} of {n} tokens"
             + (" (first " + str(limit) + " listed)" if len(deps) > limit else "") + ":"]
    if deps:
        lines.append("    pos  token     p_T   rank  teacher's top-n (token p)")
    for d in deps[:limit]:
        alts = "  ".join(f"{_printable(repr(t)[1:-1])} {p:.3f}" for t, p in d.alternatives)
        tok = _printable(repr(d.token)[1:-1])
        p = "-" if math.isnan(d.teacher_prob) else f"{d.teacher_prob:.3f}"
        lines.append(f"  {d.pos:>5}  {tok:<6} {p:>6}  {('>n' if d.rank is None else str(d.rank)):>4}  {alts}")
    return lines


def header_lines(items: list[tuple[str, str]], width: int = 110) -> list[str]:
    """``key=value`` pairs, two spaces apart, wrapped at ``width`` (a pair is never split)."""
    lines, cur = [], ""
    for k, v in items:
        cell = f"{k}={_printable(v)}"
        if cur and len(cur) + 2 + len(cell) > width:
            lines.append(cur)
            cur = cell
        else:
            cur = f"{cur}  {cell}" if cur else cell
    return lines + ([cur] if cur else [])


def render_terminal(
    row: dict[str, Any],
    *,
    phases: tuple[int, int] | None = None,
    kl_range: tuple[float, float] = DEFAULT_KL_RANGE,
    color: bool = True,
    tokenizer: Any = None,
    track: Track | None = None,
    depth: str = "256",
    width: int = 64,
) -> str:
    """The rollout as text: header, KL legend, window track (when ``track`` is given), departures
    from the teacher, then the tokens with ⟦marks⟧ before the token they refer to.

    With ``color=False`` the tokens are separated by ``|`` (``¦`` after tokens that were cut:
    generated but not trained on) and KL is shown by glyphs in the track. ``depth``: '256' or
    'truecolor'.
    """
    reset = RESET if color else ""
    lines = header_lines(_header(row, phases))
    tau = track.tau if track is not None else row.get("tau")
    tau = None if tau is None or not math.isfinite(float(tau)) else float(tau)
    lines += kl_legend(tau, kl_range, color, depth)
    lines.append("")
    strings = token_strings(row, tokenizer)
    if track is not None and len(row["token_ids"]):
        lines += track_summary(track)
        lines += render_track(track, strings, teacher_ranks(row), color=color, depth=depth, width=width,
                              kl_range=kl_range)
        lines += departures_table(row, strings, tokenizer)
        lines.append("")
    lines.append("tokens:")
    kept = int(row.get("kept_len", len(row["token_ids"])))
    ids = row["token_ids"]
    shown = strings if strings is not None else [f"⟨{int(t)}⟩" for t in ids]
    levels = kl_level(row["kl"], *kl_range)
    marks = rollout_marks(row, phases)
    parts: list[str] = []
    for i in range(len(ids) + 1):
        if i in marks:
            label = "⟦" + "·".join(marks[i]) + "⟧"
            parts.append(f"\x1b[1;7m{label}{reset}" if color else label)
        if i == len(ids):
            break
        text = _printable(shown[i])
        if color:
            lv = float(levels[i])
            # Colour each line segment separately so a newline does not drag the background along.
            segs = text.split("\n")
            style = f"{ansi_params(lv, depth)};{contrast_params(lv, depth)}" + (";2;9" if i >= kept else "")
            parts.append("\n".join(f"\x1b[{style}m{s}{reset}" if s else "" for s in segs))
        else:
            parts.append(text + ("|" if i < kept else "¦"))
    lines.append("".join(parts))
    if strings is None and row.get("text"):
        lines += ["", "text:", _printable(str(row["text"]))]
    return "\n".join(lines) + reset + "\n"
