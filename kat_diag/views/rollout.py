"""One rollout of a store, made ready to show: token strings, marks, phases, settings, problems.

The terminal and HTML views draw the same things: where KAT's onset and fire fell, the hindsight
phases (`kat_diag.kat.phases`), the teacher's alternatives and the problem the rollout answered.
This module computes them from a trace row; `terminal` and `html` only render.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kat_diag.kat.config import KATConfig
from kat_diag.traces.reader import TraceReader
from kat_diag.views.track import student_answer, verdict_of


def token_strings(row: dict[str, Any], tokenizer: Any = None) -> list[str] | None:
    """Text of each token: stored ``token_text``, else decoded by ``tokenizer``, else None."""
    ids = row["token_ids"]
    text = row.get("token_text")
    if text is not None and len(text) == len(ids) and len(ids) > 0:
        return [str(t) for t in text]
    if tokenizer is not None:
        return [tokenizer.decode([int(t)]) for t in ids]
    return None if len(ids) else []


def id_namer(row: dict[str, Any], tokenizer: Any = None) -> Any:
    """``name(id) -> text`` for the teacher's alternatives: the tokenizer's decoding, else the text of
    the same id among the rollout's own stored tokens, else ``⟨id⟩``."""
    if tokenizer is not None:
        return lambda i: tokenizer.decode([int(i)])
    seen: dict[int, str] = {}
    text = row.get("token_text")
    if text is not None and len(text) == len(row["token_ids"]):
        seen = {int(t): str(s) for t, s in zip(row["token_ids"], text, strict=True)}
    return lambda i: seen.get(int(i), f"⟨{int(i)}⟩")


def rollout_marks(row: dict[str, Any], phases: tuple[int, int] | None = None) -> dict[int, list[str]]:
    """Labels to draw *before* token position p: onset, end of the fire token, kept end, phases.

    ``phases`` is ``(pre_end, agree_end)`` from :mod:`kat_diag.kat.phases` (offline, with hindsight):
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
    for key, label in (("first_error", "first error"), ("loop_start", "loop")):
        pos = row.get(key)
        if pos is not None and int(pos) >= 0:
            add(int(pos), label)
    if (row.get("onset") if row.get("onset") is not None else -1) >= 0:
        add(row["onset"], "onset")
    if (row.get("fire") if row.get("fire") is not None else -1) >= 0:
        add(row["fire"] + 1, "fire")
    kept = row.get("kept_len", n)
    if kept is not None and 0 <= kept < n and kept != row.get("onset", -1):
        add(kept, "kept-end")
    return marks


def rollout_address(rollout_id: Any) -> tuple[int, int, int] | None:
    """(step, rank, index) of a store rollout id (``step << 32 | rank << 20 | index``, see
    `kat_diag.traces.schema.make_rollout_id`); None for ids of another form."""
    try:
        rid = int(rollout_id)
    except (TypeError, ValueError):
        return None
    if rid < 0:
        return None
    return rid >> 32, (rid >> 20) & 0xFFF, rid & 0xFFFFF


def address_text(rollout_id: Any) -> str:
    """``--step S --index I`` (plus ``--rank R`` when not 0): how `inspect` addresses the rollout."""
    a = rollout_address(rollout_id)
    if a is None:
        return "-"
    step, rank, index = a
    return f"--step {step} --index {index}" + (f" --rank {rank}" if rank else "")


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
    from kat_diag.run.config_io import build

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
            if isinstance(data, dict) and "model_type" not in data:  # not a model saved into RUN (TRL)
                return data, str(path)
    return None, f"neither {reader.dir / '_manifest.json'} nor {run / 'config.json'} holds the run config"


def rollout_phases(row: dict[str, Any], cfg: KATConfig) -> tuple[int, int] | None:
    """(pre_end, agree_end) of the rollout under its recorded tau, or None when undefined.

    Uses :mod:`kat_diag.kat.phases` (the same detector code as online); None when the rollout's tau is
    NaN (KAT inactive: no agreement phase can be defined).
    """
    tau = row.get("tau", math.nan)
    if tau is None or not math.isfinite(tau) or len(row["kl"]) == 0:
        return None
    try:
        from kat_diag.kat import phases as _phases
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

    from kat_diag.data.problems import read_problems
    from kat_diag.data.sources import load_math_dataset

    out: dict[str, Any] = {}
    try:
        if config.get("data", "world") == "world":
            from kat_diag.world.paths import world_dir_of

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
        ("verdict", verdict_of(row)),
    ]
    for key in ("first_error", "loop_start"):
        v = row.get(key)
        if v is not None and int(v) != -2:
            items.append((key, "-" if int(v) < 0 else str(v)))
    addr = address_text(row.get("rollout_id"))
    if addr != "-":
        items.insert(1, ("address", addr))
    answer = student_answer(row.get("text"))
    items.append(("answer", "(none)" if answer is None else answer))
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
