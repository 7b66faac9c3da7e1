"""Plain-text pieces every view shares: a fixed-width table, number formatting, inert strings.

Strings in a store (prompts, token text, policies) are untrusted input: `_visible` / `_printable`
show control characters, ANSI escape sequences and bidi overrides as escapes, so printing a
store cannot drive the terminal.
"""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}" if kind != "len" else f"{value:.1f}"
    return str(value)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain fixed-width table, first column left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                             strict=True)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _visible(s: str) -> str:
    """Control characters (except newline and tab) and bidi overrides as visible escapes."""
    out = []
    for ch in s:
        o = ord(ch)
        if (o < 32 and ch not in "\n\t") or 0x7F <= o < 0xA0:
            out.append(f"\\x{o:02x}")
        elif 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _printable(s: str) -> str:
    """Terminal-safe token text: newlines kept (with a visible mark), other control chars escaped."""
    out = []
    for ch in s:
        if ch == "\n":
            out.append("↵\n")
        elif ch == "\t":
            out.append("⇥")
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")  # ESC and friends must never reach the terminal raw
        elif 0x202A <= ord(ch) <= 0x202E or 0x2066 <= ord(ch) <= 0x2069:
            out.append(f"\\u{ord(ch):04x}")  # bidi overrides would reorder what is shown
        else:
            out.append(ch)
    return "".join(out)
