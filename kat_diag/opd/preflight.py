"""Preflight of a whole `train` or `record` config: every option that can be checked without a model.

Built from the generic checks of `kat_diag.run.preflight`; run before any model or data set loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kat_diag.data.sources import check_data_file
from kat_diag.run import rundir
from kat_diag.run.preflight import _option, check_choice, check_device, check_models, check_range
from kat_diag.world.paths import world_split_names


def check_sources(cfg: Any, names: tuple[str, str, str, str] = ("--teacher", "--student", "--data", "--bench")) -> None:
    """Both checkpoints (and a shared vocabulary), and the data and benchmark files of a `train` or
    `study` config (`names`: what the messages call teacher, student, data and bench)."""
    check_models(cfg.teacher, cfg.student, names=names[:2])
    fields = (cfg.question_field, cfg.answer_field)
    if cfg.data == "world":
        world_split_names(cfg.student)
    else:
        check_data_file(names[2], cfg.data, fields)
    for b in cfg.bench:
        check_data_file(names[3], b, fields)


def check_train(cfg: Any, *, resume: bool = False, overwrite: bool = False) -> None:
    """Every option of a `train` config that can be checked without loading a model or a data set."""
    from kat_diag.kat.policies import POLICY_NAMES
    from kat_diag.opd.loss import LOSSES
    from kat_diag.opd.tracking import check_report_to

    check_choice("--termination", cfg.termination, POLICY_NAMES)
    check_choice("--loss", cfg.loss, LOSSES)
    check_choice("--answer-format", cfg.answer_format, ("auto", "gsm8k", "boxed", "plain"))
    check_range("--iw-gamma", cfg.iw_gamma, lo=0)
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
    check_report_to(cfg.report_to)  # every tracker backend before anything starts or is written
    check_sources(cfg)
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
