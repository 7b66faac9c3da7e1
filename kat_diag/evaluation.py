"""Evaluation: greedy accuracy, avg@k and the unbiased pass@k on benchmark splits.

avg@k is the mean accuracy over k sampled completions per problem; pass@k is the unbiased
estimator 1 - C(n-c, k) / C(n, k) from n samples with c correct (Chen et al., 2021), computed as a
product so it never overflows. Answers are checked by `tasks.check_answer` (exact match in the
arithmetic world, math-verify on real data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from kat_diag.data.grading import check_answer
from kat_diag.data.problems import Problem
from kat_diag.run.progress import bar as tqdm  # few lines in a log, live on a terminal


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct_PK: np.ndarray) -> float:
    """Mean accuracy over all problems and samples."""
    return float(np.mean(correct_PK)) if correct_PK.size else float("nan")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
    truncate_prompts: bool = False,
) -> list[str]:
    """Batched completions (left-padded), decoded without special tokens.

    A prompt that does not fit the model's context with `max_new_tokens` is an error naming it
    (`kat_diag.run.preflight.fit_prompts`), or with `truncate_prompts` keeps its last tokens."""
    from kat_diag.run.preflight import context_length

    device = next(model.parameters()).device
    limit = context_length(model)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, mininterval=2.0):
        chunk = list(prompts[start : start + batch_size])
        enc = _encode_fitting(tokenizer, chunk, start, max_new_tokens, limit, truncate_prompts)
        enc = {k: v.to(device) for k, v in enc.items()}
        # generate() draws from the global RNG; seed it per batch so results don't depend on history.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, do_sample=do_sample,
                      synced_gpus=False)  # one process evaluates; transformers would sync FSDP ranks per token
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        seqs = model.generate(**enc, **kwargs)
        new = seqs[:, enc["input_ids"].shape[1]:]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def _encode_fitting(tokenizer, chunk: list[str], start: int, max_new_tokens: int, limit: int | None,
                    truncate: bool) -> dict:
    """The batch encoding of `chunk`, each prompt checked against the context (see `generate`)."""
    from kat_diag.run.preflight import fit_prompts

    if limit is not None:
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        fitted, n_cut = fit_prompts(ids, [f"#{start + i}" for i in range(len(ids))], max_new_tokens, limit,
                                    truncate=truncate, source="evaluation", option=None)
        if n_cut:
            return tokenizer.pad({"input_ids": fitted}, return_tensors="pt")
    return tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)


def evaluate_split(
    model,
    tokenizer,
    problems: Sequence[Problem],
    k: int = 8,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 96,
    seed: int = 0,
    progress: bool = False,
    truncate_prompts: bool = False,
) -> dict[str, float]:
    """Greedy accuracy and avg@k / pass@k (k samples per problem) on one split."""
    result: dict[str, float] = {"n": float(len(problems))}
    prompts = [p.prompt for p in problems]
    if greedy:
        outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, progress=progress,
                        desc="greedy", truncate_prompts=truncate_prompts)
        result["greedy"] = float(np.mean([check_answer(p, o) for p, o in zip(problems, outs, strict=True)]))
    if k > 0:
        rep = [pr for pr in prompts for _ in range(k)]
        outs = generate(model, tokenizer, rep, max_new_tokens=max_new_tokens, do_sample=True,
                        temperature=temperature, top_p=top_p, seed=seed, progress=progress,
                        desc=f"sample@{k}", truncate_prompts=truncate_prompts)
        correct_PK = np.array(
            [check_answer(problems[i // k], o) for i, o in enumerate(outs)], dtype=float
        ).reshape(len(problems), k)
        result[f"avg@{k}"] = avg_at_k(correct_PK)
        result[f"pass@{k}"] = float(np.mean([pass_at_k(k, int(c), k) for c in correct_PK.sum(1)]))
    return result


def evaluate_benchmarks(
    model, tokenizer, splits: dict[str, Sequence[Problem]], on_split: Callable[[str], None] | None = None,
    **kwargs
) -> dict[str, dict[str, float]]:
    """`evaluate_split` on every split, plus their unweighted mean under "mean".

    `on_split(name)` is called after each split (progress reporting)."""
    res = {}
    for name, probs in splits.items():
        res[name] = evaluate_split(model, tokenizer, probs, **kwargs)
        if on_split is not None:
            on_split(name)
    keys = [k for k in next(iter(res.values())) if k != "n"] if res else []
    res["mean"] = {k: float(np.mean([r[k] for r in res.values()])) for k in keys}
    return res
