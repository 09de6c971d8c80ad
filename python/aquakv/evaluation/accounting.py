"""Storage accounting of KV caches: how many values a window holds, how many bytes a cache holds, and the
relative perplexity increase the tables report."""
from __future__ import annotations

from typing import Optional


def relative_increase(ppl: float, base: float) -> float:
    """Relative perplexity increase over a baseline: ppl / base - 1 (0.05 means +5%)."""
    if not base > 0:
        raise ValueError(f"relative_increase: base perplexity must be positive, got {base}")
    return ppl / base - 1.0


def kv_values(config, batch: int, tokens: int) -> int:
    """Key and value elements a cache of `tokens` tokens holds for a model: 2 * layers * B * T * kv_heads * head_dim."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * batch * tokens * kv_heads * head_dim


def cache_nbytes(cache) -> Optional[int]:
    """Bytes a cache holds, or None when it cannot tell.

    Caches of this package report `nbytes()` themselves (codes, scales, zero points, fp16 sinks and buffers).
    A plain transformers DynamicCache is measured from the tensors it holds (an fp32 model's cache is fp32).
    """
    import torch
    from transformers.cache_utils import DynamicCache

    nbytes = getattr(cache, "nbytes", None)
    if nbytes is not None:
        return nbytes() if callable(nbytes) else nbytes
    if not isinstance(cache, DynamicCache):
        return None
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
