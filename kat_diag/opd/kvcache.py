"""Row-level surgery on Hugging Face KV caches, for a rollout batch that changes as it runs.

The rollout engine keeps every live rollout right-aligned in one padded column layout: row b holds
its tokens in columns [start_b, T) and a 2-D attention mask hides the rest. Rollouts that stop are
dropped (compaction), new prompts are prefilled separately and spliced into freed slots, and
columns that no live row uses any more are trimmed off the left. These helpers do exactly that on
`transformers` `DynamicCache` objects (full-attention layers, as in Qwen3 and Llama), so neither
the student nor the teacher ever recomputes a prefix it has already seen.
"""

from __future__ import annotations

import torch


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: expected a DynamicCache")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise TypeError(
                f"unsupported cache layer {type(layer).__name__}: the rollout engine needs "
                "full-attention layers (sliding-window / linear-attention caches are not supported)"
            )
    return layers


def select_rows(cache, idx_B: torch.Tensor) -> None:
    """Keep rows `idx_B` (in that order), in place."""
    for layer in _layers(cache):
        if layer.is_initialized and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, idx_B)
            layer.values = layer.values.index_select(0, idx_B)


def pad_left(cache, n: int) -> None:
    """Insert `n` empty (zero) columns on the left, in place; the caller masks them."""
    if n <= 0:
        return
    for layer in _layers(cache):
        if layer.is_initialized and layer.keys.numel():
            b, h, _, d = layer.keys.shape
            z = layer.keys.new_zeros(b, h, n, d)
            layer.keys = torch.cat([z, layer.keys], dim=2)
            layer.values = torch.cat([z.to(layer.values.dtype), layer.values], dim=2)


def trim_left(cache, n: int) -> None:
    """Drop the `n` leftmost columns, in place."""
    if n <= 0:
        return
    for layer in _layers(cache):
        if layer.is_initialized and layer.keys.numel():
            layer.keys = layer.keys[:, :, n:].contiguous()
            layer.values = layer.values[:, :, n:].contiguous()


def append_rows(cache, other) -> None:
    """Concatenate `other`'s rows after `cache`'s rows (same column count), in place."""
    mine, theirs = _layers(cache), _layers(other)
    if len(mine) != len(theirs):
        raise ValueError("caches have different numbers of layers")
    for a, b in zip(mine, theirs, strict=True):
        if not (a.is_initialized and a.keys.numel()):
            a.lazy_initialization(b.keys, b.values)
            a.keys, a.values = b.keys, b.values
            continue
        if a.keys.shape[2] != b.keys.shape[2]:
            raise ValueError(f"column mismatch: {a.keys.shape[2]} vs {b.keys.shape[2]}")
        a.keys = torch.cat([a.keys, b.keys], dim=0)
        a.values = torch.cat([a.values, b.values], dim=0)
