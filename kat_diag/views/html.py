"""One rollout as a standalone HTML page that explains its cut; nothing executable in it.

The page shows, top to bottom: the header table (ids, `--step/--index` address, tau, onset/fire,
verdict, ground truth, the student's answer); the KL legend with tau marked; the *window track* as
inline SVG (per-token KL and the window mean z_t on the log KL axis against tau, low windows
shaded, the persistence count against T, and vertical marks for L0, first error, loop start,
onset, fire, kept end); the tokens coloured by KL with ⟦marks⟧, where every token that is not the
teacher's top-1 carries the teacher's top-1 and its probability above it (ruby text: visible
without hovering); the table of those departures with the teacher's alternatives; the text.

Every string from the store is HTML-escaped and its control characters and bidi overrides are
shown as ``\\xNN`` / ``\\uNNNN``, so the page stays inert in a browser and when printed.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from kat_diag.views.colors import DEFAULT_KL_RANGE, dark, kl_level, legend_levels, level_hex, level_rgb, tau_level
from kat_diag.views.palette import (
    CUT_SHADE,
    GRID,
    INK,
    MARK_COLORS,
    MUTED,
    NO_DATA,
    NONFINITE,
    PAPER,
    PHASE_COLORS,
)
from kat_diag.views.rollout import _header, id_namer, rollout_marks, token_strings
from kat_diag.views.text import _visible
from kat_diag.views.track import MARK_NAMES, MARK_ORDER, Track, departures, teacher_ranks

_HTML_STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 2em; color: {INK}; background: {PAPER}; }}
table.meta td {{ padding: 0 0.6em 0 0; vertical-align: top; }} table.meta td.k {{ color: {MUTED}; }}
.tokens {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 2.6; margin-top: 1em; }}
.tok {{ border-radius: 2px; }}
ruby rt {{ font-size: 62%; color: {MUTED}; }}
.mark {{ background: {MARK_COLORS['onset']}; color: {PAPER}; font-weight: bold; padding: 0 3px; margin: 0 2px;
        border-radius: 3px; font-size: 80%; }}
.legend span.sw {{ display: inline-block; width: 14px; height: 14px; vertical-align: middle; }}
.cut {{ text-decoration: line-through; opacity: 0.55; }}
table.dep {{ border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 90%; }}
table.dep td, table.dep th {{ padding: 1px 10px 1px 0; text-align: left; }}
table.dep th {{ color: {MUTED}; font-weight: normal; border-bottom: 1px solid {GRID}; }}
.note {{ color: {MUTED}; font-size: 90%; }}
"""


def _esc(text: Any, quote: bool = True) -> str:
    return html.escape(_visible(str(text)), quote=quote)


def legend_html(tau: float | None, kl_range: tuple[float, float]) -> str:
    """The KL colour strip with its bounds and tau marked under it."""
    lo, hi = kl_range
    cells = legend_levels()
    strip = "".join(f'<span class="sw" style="background:{level_hex(lv)}"></span>' for lv in cells)
    t = tau_level(tau, lo, hi)
    mark = ""
    if t is not None:
        mark = (f'<div style="position:relative;height:1.2em"><span style="position:absolute;left:calc({t:.4f} * '
                f'{len(cells) * 14}px - 4px)">▲ tau {tau:.4g} nats</span></div>')
    return (f'<div class="legend">KL (log scale, nats; low = agreement) {lo:g} '
            f'<span style="display:inline-block;vertical-align:middle">{strip}{mark}</span> {hi:g} '
            f'<span class="sw" style="background:{NONFINITE}"></span> non-finite; '
            '<span class="cut">struck through</span>: cut (generated, not trained on)'
            + ("" if t is not None else "; tau undefined (KAT inactive)") + "</div>")


def track_svg(track: Track, kl_range: tuple[float, float] = DEFAULT_KL_RANGE, width: int = 1000) -> str:
    """The window track as inline SVG (see the module docstring)."""
    n = track.kl.shape[0]
    if n == 0:
        return ""
    lo, hi = kl_range
    left, right, top = 46, 12, 30
    plot_h, strip_h, count_h = 130, 12, 34
    w = max(width, left + right + 2 * n)
    cw = (w - left - right) / n  # px per token
    y_kl = top + plot_h
    y_strip = y_kl + 8
    y_count = y_strip + strip_h + 8
    h = y_count + count_h + 24

    def x(t: float) -> float:
        return left + t * cw

    def y(v: float) -> float:
        lv = float(kl_level(np.array([v]), lo, hi)[0])
        return top + plot_h * (1 - lv)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h}" '
             f'style="font: 11px system-ui, sans-serif; background:{PAPER}">']
    parts.append(f'<rect x="{left}" y="{top}" width="{w - left - right:.1f}" height="{plot_h}" fill="{NO_DATA}"/>')
    # low windows, at the token where each ends (where z_t is below tau)
    for s, e in _runs(track.low):
        parts.append(f'<rect x="{x(s):.1f}" y="{top}" width="{(e - s) * cw:.1f}" height="{plot_h}" '
                     f'fill="{PHASE_COLORS["agreement"]}" fill-opacity="0.25"><title>windows ending at '
                     f'[{s}, {e}) are below tau</title></rect>')
    if 0 <= track.kept < n:
        parts.append(f'<rect x="{x(track.kept):.1f}" y="{top}" width="{(n - track.kept) * cw:.1f}" '
                     f'height="{plot_h}" fill="{CUT_SHADE}" fill-opacity="0.08"><title>cut: tokens [{track.kept}, {n}) '
                     'generated, not trained on</title></rect>')
    for v in (1e-3, 1e-2, 1e-1, 1.0, 10.0):  # log grid
        if lo <= v <= hi:
            parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="{GRID}" '
                         f'stroke-width="0.5"/><text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" '
                         f'fill="{MUTED}">{v:g}</text>')
    pts = " ".join(f"{x(t + 0.5):.1f},{y(max(float(k), lo)):.1f}" for t, k in enumerate(track.kl) if math.isfinite(k))
    parts.append(f'<polyline points="{pts}" fill="none" stroke="{MUTED}" stroke-width="0.8"/>')
    for seg in _finite_segments(track.z):
        zp = " ".join(f"{x(t + 0.5):.1f},{y(max(float(track.z[t]), lo)):.1f}" for t in seg)
        parts.append(f'<polyline points="{zp}" fill="none" stroke="{INK}" stroke-width="2"/>')
    if track.tau is not None:
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(track.tau):.1f}" y2="{y(track.tau):.1f}" '
                     f'stroke="{MARK_COLORS["tau"]}" stroke-dasharray="5,3"/><text x="{w - right - 2}" '
                     f'y="{y(track.tau) - 3:.1f}" text-anchor="end">tau {track.tau:.3g}</text>')
    at: dict[int, list[str]] = {}
    for name in MARK_ORDER:
        pos = track.marks.get(name)
        if pos is None:
            continue
        at.setdefault(pos, []).append(name)
        color = MARK_COLORS.get(name, MARK_COLORS["reference"])
        dash = ' stroke-dasharray="2,2"' if name in ("L0", "kept_end") else ""
        parts.append(f'<line x1="{x(pos):.1f}" x2="{x(pos):.1f}" y1="{top}" y2="{y_count + count_h}" '
                     f'stroke="{color}" stroke-width="1.2"{dash}><title>{MARK_NAMES[name]} {pos}</title></line>')
    for j, (pos, names) in enumerate(sorted(at.items())):  # one label per position, rows alternate
        label = " · ".join(f"{MARK_NAMES[nm]} {pos}" for nm in names)
        color = MARK_COLORS.get(names[0], MARK_COLORS["reference"]) if len(names) == 1 else INK
        anchor = "end" if x(pos) > w - right - 8 * len(label) else "start"
        parts.append(f'<text x="{x(pos) + (2 if anchor == "start" else -2):.1f}" y="{top - 16 + 11 * (j % 2)}" '
                     f'text-anchor="{anchor}" fill="{color}">{label}</text>')
    parts.append(f'<text x="4" y="{top + 10}" fill="{MUTED}">KL</text>')
    # per-token KL colour strip
    lv = kl_level(track.kl, lo, hi)
    for t in range(n):
        parts.append(f'<rect x="{x(t):.1f}" y="{y_strip}" width="{cw + 0.3:.1f}" height="{strip_h}" '
                     f'fill="{level_hex(float(lv[t]))}"/>')
    # persistence count against T
    T = track.persistence
    for t in np.flatnonzero(track.count > 0):
        k = min(int(track.count[t]), T)
        hh = count_h * k / T
        parts.append(f'<rect x="{x(t):.1f}" y="{y_count + count_h - hh:.1f}" width="{cw + 0.3:.1f}" '
                     f'height="{hh:.1f}" fill="{PHASE_COLORS["agreement"]}"><title>t={t}: {int(track.count[t])} '
                     'consecutive low windows</title></rect>')
    parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y_count}" y2="{y_count}" stroke="{INK}" '
                 f'stroke-dasharray="3,2" stroke-width="0.7"/><text x="{left - 4}" y="{y_count + 4}" '
                 f'text-anchor="end">T={T}</text><text x="4" y="{y_count + count_h}" fill="{MUTED}">count</text>')
    for t in range(0, n + 1, 10):
        parts.append(f'<text x="{x(t):.1f}" y="{h - 6}" text-anchor="middle" fill="{MUTED}">{t}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    d = np.diff(m.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def _finite_segments(v: np.ndarray) -> list[range]:
    return [range(s, e) for s, e in _runs(np.isfinite(v))]


def departures_html(row: dict[str, Any], strings: list[str] | None, tokenizer: Any = None, limit: int = 40) -> str:
    decode = id_namer(row, tokenizer)
    if teacher_ranks(row) is None:
        return '<p class="note">teacher alternatives: not stored (no teacher_top_ids)</p>'
    deps = departures(row, strings, decode)
    head = (f"<h3>Left the teacher's top-1 at {len(deps)} of {len(row['token_ids'])} tokens"
            + (f" (first {limit})" if len(deps) > limit else "") + "</h3>")
    if not deps:
        return head
    body = "".join(
        f"<tr><td>{d.pos}</td><td>{_esc(repr(d.token))}</td>"
        f"<td>{'-' if math.isnan(d.teacher_prob) else f'{d.teacher_prob:.3f}'}</td>"
        f"<td>{'&gt;n' if d.rank is None else d.rank}</td>"
        f"<td>{' '.join(f'{_esc(repr(t))} {p:.3f}' for t, p in d.alternatives)}</td></tr>" for d in deps[:limit])
    return (head + '<table class="dep"><tr><th>pos</th><th>token</th><th>p teacher</th><th>rank</th>'
            f"<th>teacher's top-n (token p)</th></tr>{body}</table>")


def render_html(
    row: dict[str, Any],
    *,
    phases: tuple[int, int] | None = None,
    kl_range: tuple[float, float] = DEFAULT_KL_RANGE,
    tokenizer: Any = None,
    title: str | None = None,
    track: Track | None = None,
) -> str:
    """A standalone HTML page of one rollout (see the module docstring); ``track`` adds the window
    track (`kat_diag.views.track.window_track`)."""
    esc = _esc
    lo, hi = kl_range
    strings = token_strings(row, tokenizer)
    ids = row["token_ids"]
    levels = kl_level(row["kl"], lo, hi)
    marks = rollout_marks(row, phases)
    ranks = teacher_ranks(row)

    def val(name: str, i: int) -> str:
        col = row.get(name)
        if col is None or len(col) <= i:
            return "-"
        v = float(col[i])
        return f"{v:.4g}" if math.isfinite(v) else str(v)

    top_ids, top_probs = row.get("teacher_top_ids"), row.get("teacher_top_probs")

    name_of = id_namer(row, tokenizer)

    kept = int(row.get("kept_len", len(ids)))
    spans: list[str] = []
    for i in range(len(ids) + 1):
        if i in marks:
            spans.append(f'<span class="mark">{esc("·".join(marks[i]))}</span>')
        if i == len(ids):
            break
        tip = [f"t={i}  id={int(ids[i])}", f"KL={val('kl', i)}  KL_sampled={val('kl_sampled', i)}",
               f"logp_student={val('student_logprob', i)}  logp_teacher={val('teacher_logprob', i)}",
               f"H_student={val('student_entropy', i)}"]
        if top_ids is not None and len(top_ids) > i:
            tops = [f"{name_of(tid)!r} {float(p):.3f}"
                    for tid, p in zip(top_ids[i], top_probs[i] if top_probs is not None else [], strict=False)
                    if tid >= 0]
            if tops:
                tip.append("teacher top: " + ", ".join(tops))
        rgb = level_rgb(float(levels[i]))
        fg = PAPER if dark(rgb) else INK
        text = strings[i] if strings is not None else f"⟨{int(ids[i])}⟩"
        text = text.replace("\n", "↵\n")
        cls = "tok" if i < kept else "tok cut"
        span = (f'<span class="{cls}" style="background:{level_hex(float(levels[i]))};color:{fg}" '
                f'title="{esc(chr(10).join(tip), quote=True)}">{esc(text)}</span>')
        if ranks is not None and ranks[i] != 1 and top_ids is not None and top_probs is not None \
                and len(top_ids[i]) and int(top_ids[i][0]) >= 0:
            alt = name_of(int(top_ids[i][0]))
            span = f"<ruby>{span}<rt>{esc(repr(alt)[1:-1])} {float(top_probs[i][0]):.2f}</rt></ruby>"
        spans.append(span)
    items = _header(row, phases)
    cells = [f'<td class="k">{esc(k)}</td><td>{esc(v)}</td>' for k, v in items]
    meta = "".join("<tr>" + "".join(cells[i:i + 4]) + "</tr>" for i in range(0, len(cells), 4))
    page_title = title or f"rollout {row.get('rollout_id')}"
    tau = track.tau if track is not None else row.get("tau")
    tau = None if tau is None or not math.isfinite(float(tau)) else float(tau)
    track_part = ""
    if track is not None and len(ids):
        mw = track.min_window
        track_part = (
            f"<h3>Window track (W={track.window}, T={track.persistence}, L0={track.min_length}; tau "
            + ("undefined: KAT inactive for this rollout" if track.tau is None
               else f"{track.tau:.4g} ({track.tau_source})")
            + f"; min window mean {'-' if math.isnan(mw) else f'{mw:.4g} at t={track.min_window_at}'})</h3>"
            '<p class="note">grey: per-token KL; black: window mean z<sub>t</sub> (at the token where the window '
            "ends); orange: windows below tau; strip: per-token KL colour; bars: consecutive low windows (fires at T "
            "after L0); dashed lines: L0 and kept end; grey area: cut (generated, not trained on).</p>"
            + track_svg(track, kl_range))
    full_text = f"<h3>text</h3><pre>{esc(str(row['text']))}</pre>" if row.get("text") else ""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{esc(page_title)}</title><style>{_HTML_STYLE}</style></head><body>"
        f"<h2>{esc(page_title)}</h2><table class=\"meta\">{meta}</table>"
        + legend_html(tau, kl_range) + track_part
        + "<h3>Tokens</h3><p class=\"note\">above a token: the teacher's top-1 where the student's token is not it, "
        "with its probability.</p>"
        + f'<div class="tokens">{"".join(spans)}</div>'
        + departures_html(row, strings, tokenizer) + full_text + "</body></html>\n"
    )
