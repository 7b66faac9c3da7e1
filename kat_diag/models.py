"""Model loading and configuration: any Hugging Face causal LM from a local path.

Teacher and student load through `AutoModelForCausalLM.from_pretrained(path)`, the code path of a
real Qwen3 checkpoint on disk; the tiny world's models are Qwen3-architecture configs written with
`save_pretrained`. OPD compares the two models' distributions token by token, so their vocabularies
must line up: that is checked up front with an error that names both sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def tiny_qwen3_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    pad_token_id: int,
    eos_token_id: int,
    num_kv_heads: int | None = None,
    max_position_embeddings: int = 512,
):
    """A small randomly-initialisable Qwen3 config (tied embeddings, like the small Qwen3s)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
        use_sliding_window=False,
    )


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return table[dtype]


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} path does not exist: {p}")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{what} path {p} has no config.json: not a Hugging Face checkpoint")
    return p


def load_model(path: str | Path, what: str = "model", dtype: str = "fp32", device: str = "auto",
               trust_remote_code: bool = False):
    """`AutoModelForCausalLM.from_pretrained(path)` with a clear error for a bad path.

    `trust_remote_code` is passed through: off by default, so a checkpoint's own Python code
    (auto_map) never runs unless the user asked for it (`--trust-remote-code`).
    """
    from transformers import AutoModelForCausalLM

    p = _check_dir(path, what)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    return model.to(resolve_device(device))


def load_tokenizer(path: str | Path, what: str = "tokenizer", trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained(path)`, left padding for generation (remote code: see load_model)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} path does not exist: {p}")
    tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_compatible(teacher, student, teacher_tok=None, student_tok=None) -> None:
    """Teacher and student must share the vocabulary: same output size and same tokenizer."""
    vt = teacher.get_output_embeddings().weight.shape[0]
    vs = student.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise ValueError(
            f"vocabulary mismatch: teacher has {vt} output logits, student has {vs}; "
            "on-policy distillation needs a shared tokenizer and vocabulary"
        )
    if teacher_tok is not None and student_tok is not None:
        if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
            raise ValueError(
                f"tokenizer mismatch: teacher tokenizer has {len(teacher_tok)} tokens, student "
                f"tokenizer has {len(student_tok)}, or their token ids differ"
            )


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model_or_path: Any) -> int | None:
    """Positions the model was built for (config `max_position_embeddings` or its older names), from a
    loaded model, its config, or a checkpoint directory (its config.json, no weights); None if unstated."""
    cfg: Any = model_or_path
    if isinstance(model_or_path, (str, Path)):
        import json

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


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
