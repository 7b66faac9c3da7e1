"""One rollout as a standalone HTML page: tokens coloured by KL, per-token tooltips, nothing executable."""

from __future__ import annotations

import html
import math
from typing import Any

from kat_diag.views.colors import ANSI_NONFINITE, ANSI_RAMP, DEFAULT_KL_RANGE, _ansi_index, _dark, _hex, kl_level
from kat_diag.views.rollout import _header, rollout_marks, token_strings
from kat_diag.views.text import _visible

_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.meta td { padding: 0 1em 0 0; } table.meta td:first-child { color: #666; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; margin-top: 1em; }
.tok { border-radius: 2px; }
.mark { background: #000; color: #fff; font-weight: bold; padding: 0 3px; margin: 0 2px;
        border-radius: 3px; font-size: 80%; }
.legend span { display: inline-block; width: 14px; height: 14px; }
.cut { text-decoration: line-through; opacity: 0.55; }
"""


def render_html(
    row: dict[str, Any],
    *,
    phases: tuple[int, int] | None = None,
    kl_range: tuple[float, float] = DEFAULT_KL_RANGE,
    tokenizer: Any = None,
    title: str | None = None,
) -> str:
    """A standalone HTML page: tokens as spans coloured by KL, with a tooltip of per-token values.

    Every string from the store is HTML-escaped (``<script>`` shows as text) and its control
    characters and bidi overrides are shown as ``\\xNN`` / ``\\uNNNN`` (the page stays inert in a
    browser and when printed to a terminal)."""

    def esc(text: str, quote: bool = True) -> str:
        return html.escape(_visible(str(text)), quote=quote)

    lo, hi = kl_range
    strings = token_strings(row, tokenizer)
    ids = row["token_ids"]
    levels = kl_level(row["kl"], lo, hi)
    marks = rollout_marks(row, phases)

    def val(name: str, i: int) -> str:
        col = row.get(name)
        if col is None or len(col) <= i:
            return "-"
        v = float(col[i])
        return f"{v:.4g}" if math.isfinite(v) else str(v)

    top_ids, top_probs = row.get("teacher_top_ids"), row.get("teacher_top_probs")
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
            tops = []
            for tid, p in zip(top_ids[i], top_probs[i] if top_probs is not None else [], strict=False):
                if tid < 0:
                    continue
                name = repr(tokenizer.decode([int(tid)])) if tokenizer is not None else f"id {int(tid)}"
                tops.append(f"{name} {float(p):.3f}")
            if tops:
                tip.append("teacher top: " + ", ".join(tops))
        idx = _ansi_index(float(levels[i]))
        fg = "#fff" if _dark(idx) else "#000"
        text = strings[i] if strings is not None else f"⟨{int(ids[i])}⟩"
        text = text.replace("\n", "↵\n")
        cls = "tok" if i < kept else "tok cut"
        spans.append(f'<span class="{cls}" style="background:{_hex(idx)};color:{fg}" '
                     f'title="{esc(chr(10).join(tip), quote=True)}">{esc(text)}</span>')
    legend = "".join(f'<span style="background:{_hex(i)}"></span>' for i in ANSI_RAMP)
    meta = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _header(row, phases))
    page_title = title or f"rollout {row.get('rollout_id')}"
    full_text = ""
    if row.get("text"):
        full_text = f"<h3>text</h3><pre>{esc(str(row['text']))}</pre>"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{esc(page_title)}</title><style>{_HTML_STYLE}</style></head><body>"
        f"<h2>{esc(page_title)}</h2><table class=\"meta\">{meta}</table>"
        f'<p class="legend">KL (log scale, nats) {lo:g} {legend} {hi:g} '
        f'<span style="background:{_hex(ANSI_NONFINITE)}"></span> non-finite; '
        '<span class="cut" style="width:auto;height:auto">struck through</span>: cut (not trained on)</p>'
        f'<div class="tokens">{"".join(spans)}</div>{full_text}</body></html>\n'
    )
