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

from kat_diag.tasks import Problem


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
    pairs = _contexts(problems)
    if not pairs:
        return float("nan")
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        ctx_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c, _ in chunk]
        rep_ids = [tokenizer(c + r, add_special_tokens=False)["input_ids"][len(a):]
                   for (c, r), a in zip(chunk, ctx_ids, strict=True)]
        seqs = [a + b for a, b in zip(ctx_ids, rep_ids, strict=True)]
        t = max(len(s) for s in seqs)
        ids_BT = torch.full((len(seqs), t), tokenizer.pad_token_id, dtype=torch.long)
        attn_BT = torch.zeros((len(seqs), t), dtype=torch.long)
        target_BT = torch.zeros((len(seqs), t), dtype=torch.bool)  # positions whose token is scored
        for j, (a, s) in enumerate(zip(ctx_ids, seqs, strict=True)):
            ids_BT[j, : len(s)] = torch.tensor(s)
            attn_BT[j, : len(s)] = 1
            target_BT[j, len(a): len(s)] = True
        logits_BTV = model(input_ids=ids_BT.to(device), attention_mask=attn_BT.to(device)).logits.float()
        logp_BT = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, ids_BT[:, 1:, None].to(device))[..., 0]
        logp_B = (logp_BT * target_BT[:, 1:].to(device)).sum(-1)
        total += float(logp_B.exp().sum())
    return total / len(pairs)
