"""Model loading and configuration: any Hugging Face causal LM from a local path.

Teacher and student load through `AutoModelForCausalLM.from_pretrained(path)`, the code path of a
real Qwen3 checkpoint on disk; the tiny world's models are Qwen3-architecture configs written with
`save_pretrained`. OPD compares the two models' distributions token by token, so their vocabularies
must line up: that is checked up front with an error that names both sizes.
"""

from __future__ import annotations

from pathlib import Path

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


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
