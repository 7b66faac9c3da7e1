"""Checks of a command's options that run before any model or data set loads.

A misspelt `--termination`, a missing data file or a `--device cuda` on a CPU-only build used to
surface 9-27 s in, after both models had loaded, and left an empty run directory behind. These
checks read only small files (checkpoint `config.json`s, the first record of a data file, directory
listings) and raise ValueError / FileNotFoundError whose one-line message names the option and
its value; the CLI prints it as `error: ...`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kat_diag import rundir

WORLD_DIR = Path(__file__).resolve().parent.parent / "data" / "world"


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


def check_models(teacher: str, student: str) -> None:
    vt, vs = model_vocab(teacher, "--teacher"), model_vocab(student, "--student")
    if vt is not None and vs is not None and vt != vs:
        raise ValueError(f"vocabulary mismatch: --teacher {teacher} has {vt} tokens, --student {student} has {vs}; "
                         "on-policy distillation needs a shared vocabulary")


def world_dir_of(student: str | Path) -> Path:
    """Where `data=world` prompts come from (as trainer.load_prompts decides)."""
    parent = Path(student).parent
    return parent if (parent / "data").exists() else WORLD_DIR


def world_split_names(student: str | Path) -> list[str]:
    d = world_dir_of(student) / "data"
    if not d.is_dir():
        raise FileNotFoundError(f"--data world: no world data at {d}; run `kat-diag world build --out DIR` first")
    return sorted(p.stem for p in d.glob("*.jsonl"))


def check_data_file(option: str, path: str | Path, fields: Iterable[str] = ()) -> None:
    """The file exists, has a supported format, and its first record has the mapped fields."""
    from kat_diag.tasks import HF_PREFIX, is_datasets_dir, is_problem_record, parse_hf_spec

    if str(path).startswith(HF_PREFIX):  # loaded by `datasets` later (an offline miss is its own one-line error)
        parse_hf_spec(str(path))
        return
    if is_datasets_dir(path):  # a save_to_disk directory: fields are checked when it loads
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option} {p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{option} {p}: unsupported format {suffix!r} (use .jsonl or .parquet)")
    first: Any = None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(p).names
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise ValueError(f"{option} {p}: not a readable Parquet file ({e})") from e
        first = dict.fromkeys(names)
    else:
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{option} {p}:{lineno}: invalid JSON ({e.msg})") from e
                    break
    if first is None:
        raise ValueError(f"{option} {p}: the data set is empty")
    if not isinstance(first, dict):
        raise ValueError(f"{option} {p}: records must be JSON objects")
    if is_problem_record(first):
        return  # a world data file (tasks.write_jsonl): read as the world's problems
    for name in fields:
        if name not in first:
            raise KeyError(f"{option} {p}: records have no field {name!r} (fields: {sorted(first)}); "
                           "set --question-field / --answer-field")


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


def check_train(cfg: Any, *, resume: bool = False, overwrite: bool = False) -> None:
    """Every option of a `train` config that can be checked without loading a model or a data set."""
    from kat_diag.loss import LOSSES
    from kat_diag.termination import POLICY_NAMES

    check_choice("--termination", cfg.termination, POLICY_NAMES)
    check_choice("--loss", cfg.loss, LOSSES)
    check_choice("--answer-format", cfg.answer_format, ("auto", "gsm8k", "boxed", "plain"))
    check_range("--lr", cfg.lr, lo=0, lo_open=True)
    check_range("--grad-clip", cfg.grad_clip, lo=0, lo_open=True)
    check_range("--warmup-steps", cfg.warmup_steps, lo=0)
    for name in ("eval_k", "eval_n"):
        check_range(_option(name), getattr(cfg, name), lo=1)
    for name in ("eval_every", "ckpt_every", "trace_every"):
        check_range(_option(name), getattr(cfg, name), lo=0)
    check_range("--stop-after", cfg.max_steps_this_run, lo=1)
    if cfg.termination in ("prefix", "kat+prefix"):
        if not cfg.prefix_len:
            raise ValueError(f"--termination {cfg.termination} needs --prefix-len P (>= 1)")
        check_range("--prefix-len", cfg.prefix_len, lo=1)
    if cfg.termination == "random":
        if cfg.random_target is not None:
            check_range("--random-target", cfg.random_target, lo=0, lo_open=True)
        elif cfg.random_from is None:
            raise ValueError("--termination random needs --random-target N or --random-from KAT_RUN")
        elif not (Path(cfg.random_from) / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"--random-from {cfg.random_from}: no metrics.jsonl to length-match")
    check_device(cfg.device)
    check_models(cfg.teacher, cfg.student)
    if cfg.data == "world":
        world_split_names(cfg.student)
    else:
        check_data_file("--data", cfg.data, (cfg.question_field, cfg.answer_field))
    for b in cfg.bench:
        check_data_file("--bench", b, (cfg.question_field, cfg.answer_field))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 owns the directory; the others follow it
        rundir.check_out(cfg.out, resume=resume, overwrite=overwrite)


def check_record(cfg: Any, *, overwrite: bool = False) -> None:
    """Every option of a `record` config that can be checked without loading a model or data."""
    check_choice("--termination", cfg.termination, ("none", "kat"))
    check_models(cfg.teacher, cfg.student)
    if cfg.data == "world":
        splits = world_split_names(cfg.student)
        if cfg.split not in splits:
            raise ValueError(f"--split {cfg.split!r} is not a split of the world ({', '.join(splits)})")
    else:
        check_data_file("--data", cfg.data, ("question", "answer"))
        if cfg.split != "train":
            raise ValueError(f"--split {cfg.split!r}: a data file has only the split 'train'")
    for name in ("n_prompts", "batch_size", "samples_per_prompt"):
        check_range(_option(name) if name != "samples_per_prompt" else "--samples", getattr(cfg, name), lo=1)
    rundir.check_out(cfg.out, overwrite=overwrite, owns_runs=False)
