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
from collections.abc import Iterable
from pathlib import Path


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
