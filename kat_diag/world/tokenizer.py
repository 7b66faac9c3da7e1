"""A character-level tokenizer saved as a Hugging Face fast tokenizer.

The embedded world must load through exactly the code path a user takes for a Qwen3 checkpoint
on disk (`AutoTokenizer.from_pretrained(path)`), so the tokenizer is built with the `tokenizers`
library and wrapped in `PreTrainedTokenizerFast`. One token per printable ASCII character (and
newline) keeps encode/decode an exact round trip.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII + space + \n


def build_char_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per character, pad/eos/unk specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character into its own piece; [\s\S] also matches newline.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation batches are left-padded
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return fast


def save_char_tokenizer(path: str | Path):
    """Build and `save_pretrained` the tokenizer to `path`; return it."""
    tok = build_char_tokenizer()
    tok.save_pretrained(str(path))
    return tok
