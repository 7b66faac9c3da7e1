"""Offline inspection of a trace store: run summary, and one rollout rendered token by token.

A researcher looking at an agreement trap wants to *see* it: which tokens carried KL, where the low
run began, where KAT fired. This module turns a :class:`~kat_diag.traces.TraceReader` into

* a summary (rollouts, tokens, steps, policies, fired share, onset, kept length, accuracy), as a
  dict (JSON-ready) and as a text table;
* one rollout as terminal text (ANSI 256 colours) or a standalone HTML page, every token coloured
  by its reverse KL on a log scale (blue = agreement, red = disagreement, grey = non-finite), with
  the onset / fire / phase boundaries marked.

Token strings come from the store's ``token_text`` column when the writer recorded it (the trainer
does), else from a Hugging Face tokenizer when one is given, else the token ids are shown as
``⟨id⟩`` (the rollout's full ``text`` is printed below them).
"""

from __future__ import annotations

import html
import math
from collections import Counter
from typing import Any

import numpy as np

from kat_diag.detector import KATConfig
from kat_diag.traces import TraceReader

SUMMARY_COLUMNS = ["step", "policy", "fire", "onset", "gen_len", "kept_len", "correct", "stop_reason"]

# Colour ramp from the xterm 256-colour cube: blue -> cyan -> green -> yellow -> red.
ANSI_RAMP: tuple[int, ...] = (
    17, 18, 19, 20, 21, 27, 33, 39, 45, 51, 50, 49, 48, 47, 46, 82, 118, 154, 190, 226, 220, 214,
    208, 202, 196,
)
ANSI_NONFINITE = 244  # grey
DEFAULT_KL_RANGE = (1e-3, 10.0)  # nats; fixed so colours compare across rollouts and runs
_CUBE_LEVELS = (0, 95, 135, 175, 215, 255)


# --------------------------------------------------------------------------------------------------
# Summary


class _Acc:
    """Running sums for one group of rollouts (one policy, or all)."""

    def __init__(self) -> None:
        self.rollouts = self.tokens = self.fired = self.kept = self.graded = self.correct = 0
        self.onset_sum = self.stopped = 0
        self.steps: set[int] = set()

    def add(self, b: Any, sel: np.ndarray) -> None:
        fire = b["fire"][sel]
        fired = fire >= 0
        correct = b["correct"][sel]
        self.rollouts += int(sel.sum())
        self.tokens += int(b["gen_len"][sel].sum())
        self.kept += int(b["kept_len"][sel].sum())
        self.fired += int(fired.sum())
        self.stopped += int((b["stop_reason"][sel] == "policy").sum())  # KAT, prefix, random: every policy stop
        self.onset_sum += int(b["onset"][sel][fired].sum())
        self.graded += int((correct >= 0).sum())
        self.correct += int((correct == 1).sum())
        self.steps.update(np.unique(b["step"][sel]).tolist())

    def as_dict(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "rollouts": self.rollouts,
            "tokens": self.tokens,
            "steps": len(self.steps),
            "first_step": min(self.steps) if self.steps else None,
            "last_step": max(self.steps) if self.steps else None,
            "fired_share": ratio(self.fired, self.rollouts),
            "stopped_share": ratio(self.stopped, self.rollouts),
            "mean_onset": ratio(self.onset_sum, self.fired),
            "mean_gen_len": ratio(self.tokens, self.rollouts),
            "mean_kept_len": ratio(self.kept, self.rollouts),
            "kept_ratio": ratio(self.kept, self.tokens),
            "graded": self.graded,
            "accuracy": ratio(self.correct, self.graded),
        }


def summarize(reader: TraceReader, **filters: Any) -> dict[str, Any]:
    """Summary of the (filtered) store, reading only per-rollout scalar columns.

    ``stopped_share`` counts every stop by the termination policy (KAT fires, prefix budgets,
    random cuts); ``fired_share`` only KAT fires; ``mean_onset`` is over fired rollouts;
    ``kept_ratio`` is kept tokens / generated tokens;
    ``accuracy`` is over graded rollouts. Values that are undefined (no rollouts, none fired, none
    graded) are None, so the dict serialises to strict JSON.
    """
    total = _Acc()
    per_policy: dict[str, _Acc] = {}
    stops: Counter[str] = Counter()
    for b in reader.iter_batches(SUMMARY_COLUMNS, **filters):
        total.add(b, np.ones(b.num_rows, dtype=bool))
        for policy in np.unique(b["policy"]).tolist():
            per_policy.setdefault(policy, _Acc()).add(b, b["policy"] == policy)
        stops.update(b["stop_reason"].tolist())
    out = {
        "store": str(reader.dir),
        "run": reader.manifest.get("run"),
        "schema_version": reader.manifest.get("schema_version"),
        "files": len(reader.files),
        **total.as_dict(),
        "stop_reasons": dict(sorted(stops.items())),
        "policies": {name: acc.as_dict() for name, acc in sorted(per_policy.items())},
        "skipped_files": [str(p) for p, _ in reader.skipped],
    }
    return out


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


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as text: a header line, one table row per policy and one for all rollouts."""
    headers = ["policy", "rollouts", "tokens", "steps", "stopped", "mean onset", "mean gen", "mean kept",
               "kept/gen", "accuracy"]

    def row(name: str, s: dict[str, Any]) -> list[str]:
        steps = "-" if s["first_step"] is None else f"{s['first_step']}..{s['last_step']} ({s['steps']})"
        return [_printable(name), _fmt(s["rollouts"]), _fmt(s["tokens"]), steps, _fmt(s["stopped_share"], "pct"),
                _fmt(s["mean_onset"], "len"), _fmt(s["mean_gen_len"], "len"), _fmt(s["mean_kept_len"], "len"),
                _fmt(s["kept_ratio"], "pct"), _fmt(s["accuracy"], "pct")]

    rows = [row(name, s) for name, s in summary["policies"].items()]
    if len(rows) != 1:
        rows.append(row("all", summary))
    head = _printable(f"trace store {summary['store']}  run={summary['run']}  schema v{summary['schema_version']}  "
                      f"files={summary['files']}")
    stops = _printable(", ".join(f"{k}: {v}" for k, v in summary["stop_reasons"].items())) or "-"
    parts = [head, "", format_table(headers, rows), "", f"stop reasons: {stops}",
             "(stopped: share of rollouts ended by the termination policy; mean onset: KAT fires only)"]
    if summary["skipped_files"]:
        parts.append(f"skipped (unreadable): {', '.join(summary['skipped_files'])}")
    return "\n".join(parts)


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


def token_strings(row: dict[str, Any], tokenizer: Any = None) -> list[str] | None:
    """Text of each token: stored ``token_text``, else decoded by ``tokenizer``, else None."""
    ids = row["token_ids"]
    text = row.get("token_text")
    if text is not None and len(text) == len(ids) and len(ids) > 0:
        return [str(t) for t in text]
    if tokenizer is not None:
        return [tokenizer.decode([int(t)]) for t in ids]
    return None if len(ids) else []


def rollout_marks(row: dict[str, Any], phases: tuple[int, int] | None = None) -> dict[int, list[str]]:
    """Labels to draw *before* token position p: onset, end of the fire token, kept end, phases.

    ``phases`` is ``(pre_end, agree_end)`` from :mod:`kat_diag.analysis.phases` (offline, with hindsight):
    the agreement phase is ``[pre_end, agree_end)``, post-agreement ``[agree_end, n)``.
    """
    n = len(row["token_ids"])
    marks: dict[int, list[str]] = {}

    def add(pos: int, label: str) -> None:
        if 0 <= pos <= n:
            marks.setdefault(pos, []).append(label)

    if phases is not None and phases[0] < n:
        add(phases[0], "agreement")
        if phases[1] < n:
            add(phases[1], "post")
    if row.get("onset", -1) >= 0:
        add(row["onset"], "onset")
    if row.get("fire", -1) >= 0:
        add(row["fire"] + 1, "fire")
    kept = row.get("kept_len", n)
    if 0 <= kept < n and kept != row.get("onset", -1):
        add(kept, "kept-end")
    return marks


class MissingSettings(ValueError):
    """The store's run settings are not known and the options do not supply them."""


def kat_config(config: dict[str, Any] | None, *, source: str = "the run config",
               needed: tuple[str, ...] | None = None, **overrides: Any) -> KATConfig:
    """KATConfig of a run: its recorded config's ``kat`` section, with non-None overrides applied.

    Never silent defaults: without a ``kat`` section every field in ``needed`` (default: all) must
    come from ``overrides``, else MissingSettings names what is missing (fields not needed by the
    caller keep KATConfig's defaults, which it does not read). Unknown keys in the section are an
    error naming them.
    """
    from kat_diag.config_io import build

    names = [f for f in KATConfig.__dataclass_fields__ if needed is None or f in needed]
    section = (config or {}).get("kat")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not isinstance(section, dict):
        missing = [n for n in names if n not in given]
        if missing:
            where = source if config is None else f"{source} has no 'kat' section"
            raise MissingSettings(f"no KAT settings for this store: {where}; pass "
                                  + ", ".join("--" + n.replace("_", "-") for n in missing))
        section = {}
    base = build(KATConfig, section, where="kat")
    return build(KATConfig, given, where="kat", base=base)


def store_config(reader: TraceReader) -> tuple[dict[str, Any] | None, str]:
    """The run settings of a store and where they came from: the manifest's config, else the run's
    config.json (or record_config.json) next to traces/, else (None, what was looked for)."""
    import json

    cfg = reader.config
    if isinstance(cfg, dict) and cfg:
        return cfg, f"{reader.dir / '_manifest.json'}"
    run = reader.dir.parent if reader.dir.name == "traces" else reader.dir
    for name in ("config.json", "record_config.json"):
        path = run / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise MissingSettings(f"{path}: unreadable run config ({e})") from e
            if isinstance(data, dict):
                return data, str(path)
    return None, f"neither {reader.dir / '_manifest.json'} nor {run / 'config.json'} holds the run config"


def rollout_phases(row: dict[str, Any], cfg: KATConfig) -> tuple[int, int] | None:
    """(pre_end, agree_end) of the rollout under its recorded tau, or None when undefined.

    Uses :mod:`kat_diag.analysis.phases` (the same detector code as online); None when the rollout's tau is
    NaN (KAT inactive: no agreement phase can be defined).
    """
    tau = row.get("tau", math.nan)
    if tau is None or not math.isfinite(tau) or len(row["kl"]) == 0:
        return None
    try:
        from kat_diag.analysis import phases as _phases
    except ImportError:  # pragma: no cover - phases not built yet
        return None
    kl = np.asarray(row["kl"], dtype=np.float64)
    spans = _phases.segment(kl, np.array([0, len(kl)], dtype=np.int64), cfg, np.array([tau]))
    return int(spans.pre_end[0]), int(spans.agree_end[0])


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN / inf
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def rollout_json(row: dict[str, Any], phases: tuple[int, int] | None = None) -> dict[str, Any]:
    """One rollout as a JSON-ready dict (non-finite floats become null), with its phase spans."""
    out = {k: _jsonable(v) for k, v in row.items()}
    out["phases"] = None if phases is None else {"pre_end": phases[0], "agree_end": phases[1]}
    return out


def problem_index(config: dict[str, Any] | None) -> dict[str, Any]:
    """Problems (prompt, expected answer) of a run's data by id: the world's split files, or the
    run's --data / --bench files. Empty when the data is not available here."""
    if not config:
        return {}
    from pathlib import Path

    from kat_diag.tasks import load_math_dataset, read_problems

    out: dict[str, Any] = {}
    try:
        if config.get("data", "world") == "world":
            from kat_diag.preflight import world_dir_of

            for f in sorted((world_dir_of(str(config.get("student", ""))) / "data").glob("*.jsonl")):
                out.update((p.id, p) for p in read_problems(f))
            return out
        kw = {"question_field": config.get("question_field", "question"),
              "answer_field": config.get("answer_field", "answer"),
              "answer_format": config.get("answer_format", "auto")}
        for f in [config["data"], *(config.get("bench") or [])]:
            if Path(f).is_file():
                out.update((p.id, p) for p in load_math_dataset(f, **kw))
    except (OSError, ValueError, KeyError):
        pass
    return out


LIST_COLUMNS = ["rollout_id", "step", "policy", "prompt_id", "correct", "gen_len", "kept_len", "fire",
                "stop_reason"]


def rollout_list(reader: TraceReader, **filters: Any) -> list[dict[str, Any]]:
    """One dict per (filtered) rollout: id, step, policy, prompt id, correctness, length, kept, fire, stop."""
    rows: list[dict[str, Any]] = []
    for b in reader.iter_batches(LIST_COLUMNS, **filters):
        for i in range(b.num_rows):
            c = int(b["correct"][i])
            rows.append({"rollout_id": int(b["rollout_id"][i]), "step": int(b["step"][i]),
                         "policy": str(b["policy"][i]), "prompt_id": str(b["prompt_id"][i]),
                         "correct": None if c < 0 else bool(c), "gen_len": int(b["gen_len"][i]),
                         "kept_len": int(b["kept_len"][i]), "fire": int(b["fire"][i]),
                         "stop_reason": str(b["stop_reason"][i])})
    rows.sort(key=lambda r: (r["step"], r["rollout_id"]))
    return rows


def format_list(rows: list[dict[str, Any]], problems: dict[str, Any] | None = None) -> str:
    """The rollout list as a table (prompt text when the run's data is available)."""
    problems = problems or {}
    headers = ["rollout", "step", "policy", "prompt", "correct", "length", "kept", "fire", "stop"]

    def prompt(pid: str) -> str:
        p = problems.get(pid)
        text = pid if p is None else f"{pid}: {' '.join(p.prompt.split())}"
        return text if len(text) <= 48 else text[:47] + "…"

    body = [[str(r["rollout_id"]), str(r["step"]), _printable(r["policy"]), _printable(prompt(r["prompt_id"])),
             "-" if r["correct"] is None else ("yes" if r["correct"] else "no"), str(r["gen_len"]),
             str(r["kept_len"]), "-" if r["fire"] < 0 else str(r["fire"]), _printable(r["stop_reason"])]
            for r in rows]
    return format_table(headers, body)


def teacher_alternatives(row: dict[str, Any], tokenizer: Any) -> list[list[tuple[str, float]]] | None:
    """Per token, the teacher's top-n alternatives as (text, probability); None without a tokenizer."""
    top_ids, top_probs = row.get("teacher_top_ids"), row.get("teacher_top_probs")
    if tokenizer is None or top_ids is None:
        return None
    out = []
    for i in range(len(top_ids)):
        probs = top_probs[i] if top_probs is not None else [float("nan")] * len(top_ids[i])
        out.append([(tokenizer.decode([int(t)]), float(p)) for t, p in zip(top_ids[i], probs, strict=False)
                    if int(t) >= 0])
    return out


def _header(row: dict[str, Any], phases: tuple[int, int] | None) -> list[tuple[str, str]]:
    tau = row.get("tau", math.nan)
    correct = row.get("correct")
    items = [
        ("rollout", str(row.get("rollout_id"))), ("run", str(row.get("run"))), ("step", str(row.get("step"))),
        ("rank", str(row.get("rank"))), ("prompt", str(row.get("prompt_id"))), ("policy", str(row.get("policy"))),
        ("tau", "-" if tau is None or math.isnan(tau) else f"{tau:.4g}"),
        ("onset", str(row.get("onset"))), ("fire", str(row.get("fire"))), ("stop", str(row.get("stop_reason"))),
        ("gen_len", str(row.get("gen_len"))), ("kept_len", str(row.get("kept_len"))),
        ("correct", "-" if correct is None else str(correct)),
    ]
    if "prompt_text" in row:
        prompt = row["prompt_text"]
        items.append(("prompt text", "(not found in the run's data)" if prompt is None else str(prompt).rstrip("\n")))
        items.append(("expected", "-" if row.get("expected") is None else str(row["expected"])))
    if phases is not None:
        items.append(("phases", f"pre [0,{phases[0]}) agreement [{phases[0]},{phases[1]}) post [{phases[1]},)"))
    kl = np.asarray(row["kl"], dtype=np.float64)
    if len(kl):
        finite = kl[np.isfinite(kl)]
        items.append(("mean KL", f"{finite.mean():.4g}" if len(finite) else "-"))
    return items


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
