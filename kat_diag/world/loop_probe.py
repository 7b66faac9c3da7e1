"""How readily a model starts a repetition loop on a correct path: the world's loop-start rate.

Whether the agreement trap survives OPD in the embedded world turns on one number per model: the
probability that, after a correct step line, the model writes that same line again (the first
repeat of a loop). A student that starts loops far more often than its teacher is corrected at
the loop start by OPD (high KL there), however low the KL inside the loop; a teacher that starts
them about as often leaves the loops in place. Sampling thousands of rollouts measures this
noisily; scoring the repeat directly measures it exactly on every step of every problem:

    rate = mean over problems p and step lines k of  P_model(line_k + "\\n" | prompt, lines_0..k)

Every context is scored in one padded forward pass per batch (no generation, no per-token loop).
"""

from __future__ import annotations

import torch

from kat_diag.data.problems import Problem
from kat_diag.world.sft import encode_sft_batch


def _contexts(problems: list[Problem]) -> list[tuple[str, str]]:
    """(context, repeat) for every step line of every problem: the correct path up to and including
    the line, then that line once more."""
    out = []
    for p in problems:
        lines = [line for line in p.solution.split("\n") if line and not line.startswith("#")]
        for k, line in enumerate(lines):
            out.append((p.prompt + "".join(x + "\n" for x in lines[: k + 1]), line + "\n"))
    return out


@torch.no_grad()
def loop_start_rate(model, tokenizer, problems: list[Problem], batch_size: int = 128) -> float:
    """Mean probability of repeating the step line just written, over all step lines (see module
    docstring); NaN when the problems have no step lines."""
    # Each (context, repeat) is an SFT example whose completion is the repeat: `encode_sft_batch`
    # pads it and masks the context; a "loop" kind adds no end of text after the repeat.
    docs = [Problem(id=str(i), prompt=c, answer="", solution=r, kind="loop")
            for i, (c, r) in enumerate(_contexts(problems))]
    if not docs:
        return float("nan")
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(docs), batch_size):
        batch = {k: v.to(device) for k, v in encode_sft_batch(tokenizer, docs[i: i + batch_size]).items()}
        logits_BTV = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels_BT = batch["labels"][:, 1:]
        scored_BT = labels_BT != -100
        logp_BT = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, labels_BT.clamp(min=0)[..., None])[..., 0]
        total += float((logp_BT * scored_BT).sum(-1).exp().sum())
    return total / len(docs)
