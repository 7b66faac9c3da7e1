"""Checks of a command's options that run before any model or data set loads.

A misspelt option, a missing checkpoint or a `--device cuda` on a CPU-only build used to surface
9-27 s in, after both models had loaded, and left an empty run directory behind. These checks read
only small files (checkpoint `config.json`s, directory listings) and raise ValueError /
FileNotFoundError whose one-line message names the option and its value; the CLI prints it as
`error: ...`. The checks of a whole `train` / `record` config live beside it in
`kat_diag.opd.preflight`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_choice(option: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{option} {value!r} is not one of {', '.join(choices)}")


def check_range(option: str, value: float | None, *, lo: float | None = None, lo_open: bool = False,
                hi: float | None = None) -> None:
    if value is None:
        return
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{option} must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise ValueError(f"{option} must be <= {hi:g}, got {value:g}")


def model_vocab(path: str | Path, option: str) -> int | None:
    """The output vocabulary of a checkpoint directory from its config.json (None if not stated)."""
    p = Path(path)
    if p.is_file():
        raise FileNotFoundError(f"{option} {p}: a file, not a checkpoint directory")
    if not p.is_dir():
        raise FileNotFoundError(f"{option} {p}: no such checkpoint directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{option} {p}: no config.json, not a Hugging Face checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{option} {p}: unreadable config.json ({e})") from e
    vocab = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    if vocab is None and isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
        vocab = cfg["text_config"].get("vocab_size")
    return int(vocab) if isinstance(vocab, int) else None


def check_models(teacher: str, student: str, names: tuple[str, str] = ("--teacher", "--student")) -> None:
    """Both checkpoints exist and share the vocabulary; `names` are what the messages call them."""
    vt, vs = model_vocab(teacher, names[0]), model_vocab(student, names[1])
    if vt is not None and vs is not None and vt != vs:
        raise ValueError(f"vocabulary mismatch: {names[0]} {teacher} has {vt} tokens, {names[1]} {student} has {vs}; "
                         "on-policy distillation needs a shared vocabulary")


def check_device(device: str) -> None:
    """`--device`: auto, cpu, cuda[:N] (available), mps (available)."""
    import torch

    if device in ("auto", "cpu"):
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu or auto")
        if ":" in device:
            idx = device.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: no such CUDA device ({torch.cuda.device_count()} visible)")
        return
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("--device mps: MPS is not available on this machine")
        return
    raise ValueError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model_or_path: Any) -> int | None:
    """Positions the model was built for (config `max_position_embeddings` or its older names), from a
    loaded model, its config, or a checkpoint directory (its config.json, no weights); None if unstated."""
    cfg: Any = model_or_path
    if isinstance(model_or_path, (str, Path)):
        try:
            cfg = json.loads((Path(model_or_path) / "config.json").read_text())
        except (OSError, ValueError):
            return None
    cfg = getattr(cfg, "config", cfg)

    def get(c: Any, key: str) -> Any:
        return c.get(key) if isinstance(c, dict) else getattr(c, key, None)

    for c in (cfg, get(cfg, "text_config")):
        for key in _CONTEXT_KEYS:
            value = get(c, key) if c is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def context_limit(*models: Any) -> int | None:
    """The smallest `context_length` of the given models (None if none states one)."""
    lengths = [n for n in (context_length(m) for m in models) if n is not None]
    return min(lengths) if lengths else None


def fit_prompts(prompts: Sequence[Sequence[int]], names: Sequence[str], max_new_tokens: int, limit: int | None,
                *, truncate: bool = False, source: str = "prompts",
                option: str | None = "--truncate-prompts") -> tuple[list[list[int]], int]:
    """Prompts (token ids) checked against the models' context: a prompt plus the rollout budget must
    fit in `limit` positions. Past it a model computes garbage (RoPE beyond its range: it trains
    on nonsense and exits 0) or runs out of memory (a 1 MB prompt), so a prompt that does not fit
    is an error naming it, unless `truncate`: then each such prompt keeps its last
    `limit - max_new_tokens` tokens (the end of a prompt holds the question). `option` is the
    caller's truncation option, named in the message (None: it has none). Returns (prompts, number cut)."""
    out = [list(p) for p in prompts]
    if limit is None:
        return out, 0
    room = limit - max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the models' context "
                         f"is {limit} positions (max_position_embeddings)")
    too_long = [i for i, p in enumerate(out) if len(p) > room]
    if not too_long:
        return out, 0
    if truncate:
        return [p[-room:] if len(p) > room else p for p in out], len(too_long)
    i = max(too_long, key=lambda j: len(out[j]))
    raise ValueError(
        f"{source}: prompt {names[i]!r} has {len(out[i])} tokens, which with --max-new-tokens {max_new_tokens} "
        f"needs {len(out[i]) + max_new_tokens} positions; the models have {limit} (max_position_embeddings). "
        f"{len(too_long)} of {len(out)} prompts are too long: shorten them"
        + (f", lower --max-new-tokens, or pass {option} (keeps the last {room} tokens of each)" if option
           else " or lower the rollout budget"))
