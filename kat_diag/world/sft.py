"""Supervised fine-tuning of the embedded world's teacher and student.

OPD needs a teacher that solves the task and a weaker student that starts below it; both are
trained here from random init on the world's step-by-step solutions (loss on the completion only),
the same way a user would SFT a base model before distilling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kat_diag.data.problems import Problem
from kat_diag.run.progress import bar as tqdm  # few lines in a log, live on a terminal


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0


def encode_sft_batch(tokenizer, problems: list[Problem]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+solution+eos with labels masked (-100) on prompt and padding."""
    seqs, labels = [], []
    for p in problems:
        prompt_ids = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        sol_ids = tokenizer(p.solution, add_special_tokens=False)["input_ids"]
        if p.kind != "loop":  # a loop document is cut off mid-loop: it never ends the text
            sol_ids = sol_ids + [tokenizer.eos_token_id]
        seqs.append(prompt_ids + sol_ids)
        labels.append([-100] * len(prompt_ids) + sol_ids)
    t = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), t), tokenizer.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(seqs), t), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_t[i, : len(s)] = torch.tensor(lab)
        attn[i, : len(s)] = 1
    return {"input_ids": input_ids, "labels": label_t, "attention_mask": attn}


def train_sft(
    model,
    tokenizer,
    batches: Iterator[list[Problem]],
    cfg: SFTConfig,
    desc: str = "sft",
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Train `model` in place on `cfg.steps` batches drawn from `batches`; returns the loss curve."""
    torch.manual_seed(cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        batch = encode_sft_batch(tokenizer, next(batches))
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if log is not None:
                log({"step": step, "loss": losses[-1], "lr": sched.get_last_lr()[0]})
    model.eval()
    return losses
