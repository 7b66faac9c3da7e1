"""One rollout in a terminal: tokens coloured by reverse KL (ANSI 256), marks for onset, fire, phases."""

from __future__ import annotations

from typing import Any

from kat_diag.views.colors import ANSI_NONFINITE, ANSI_RAMP, DEFAULT_KL_RANGE, _ansi_index, _dark, kl_level
from kat_diag.views.rollout import _header, rollout_marks, token_strings
from kat_diag.views.text import _printable


def render_terminal(
    row: dict[str, Any],
    *,
    phases: tuple[int, int] | None = None,
    kl_range: tuple[float, float] = DEFAULT_KL_RANGE,
    color: bool = True,
    tokenizer: Any = None,
) -> str:
    """The rollout as text with each token's background coloured by its KL (ANSI 256 colours).

    Markers ``⟦onset⟧``, ``⟦fire⟧``, ``⟦agreement⟧``, ``⟦post⟧`` are drawn before the token they
    refer to. With ``color=False`` the tokens are separated by ``|`` instead of coloured. Tokens
    after the kept length (generated but not trained on) are struck through and dimmed, or with
    ``color=False`` separated by ``¦``. Every string from the store goes through ``_printable``: ANSI
    escape sequences and other control characters in it are shown as ``\\xNN``, never sent raw.
    """
    reset = "\x1b[0m" if color else ""
    lines = ["  ".join(f"{k}={_printable(v)}" for k, v in _header(row, phases))]
    lo, hi = kl_range
    # Legend: the ramp with its end values.
    if color:
        ramp = "".join(f"\x1b[48;5;{i}m \x1b[0m" for i in ANSI_RAMP)
        lines.append(f"KL (log scale) {lo:g} {ramp} {hi:g} nats   \x1b[48;5;{ANSI_NONFINITE}m \x1b[0m non-finite"
                     "   \x1b[2;9mstruck\x1b[0m: cut (not trained on)")
    else:
        lines.append("tokens: kept tok| ... cut tok¦ (cut: generated but not trained on)")
    lines.append("")
    kept = int(row.get("kept_len", len(row["token_ids"])))
    strings = token_strings(row, tokenizer)
    ids = row["token_ids"]
    shown = strings if strings is not None else [f"⟨{int(t)}⟩" for t in ids]
    levels = kl_level(row["kl"], lo, hi)
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
            idx = _ansi_index(float(levels[i]))
            fg = 255 if _dark(idx) else 16
            # Colour each line segment separately so a newline does not drag the background along.
            segs = text.split("\n")
            style = f"48;5;{idx};38;5;{fg}" + (";2;9" if i >= kept else "")
            parts.append("\n".join(f"\x1b[{style}m{s}{reset}" if s else "" for s in segs))
        else:
            parts.append(text + ("|" if i < kept else "¦"))
    lines.append("".join(parts))
    if strings is None and row.get("text"):
        lines += ["", "text:", _printable(str(row["text"]))]
    return "\n".join(lines) + reset + "\n"
