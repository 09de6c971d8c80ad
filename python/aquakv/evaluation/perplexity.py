"""Perplexity under a KV cache: the evaluation protocol (docs/evaluation.md).

The token stream is cut into non-overlapping windows of `window` tokens. Each window starts from a fresh
cache and is fed through the model `step` tokens at a time, so every token after the first step attends
to keys and values that went through the cache (and its quantizer) rather than to exact states. Every
next-token prediction inside the window is scored: window - 1 predictions per window.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import torch
from transformers.cache_utils import DynamicCache

from aquakv.evaluation.accounting import cache_nbytes, kv_values, relative_increase
from aquakv.evaluation.nll import token_nll, window_nll
from aquakv.evaluation.result import PerplexityResult
from aquakv.evaluation.table import count, format_table
from aquakv.evaluation.windows import cut_windows
from aquakv.progress import progress as progress_bar

log = logging.getLogger(__name__)

# Re-exported: code written against the single-module layout imports them from here.
__all__ = ["CacheFactory", "PerplexityResult", "cache_nbytes", "default_cache_factory", "evaluate_perplexity",
           "format_table", "kv_values", "relative_increase", "token_nll", "window_nll"]

CacheFactory = Callable[[torch.nn.Module], object]


def default_cache_factory(model: torch.nn.Module) -> DynamicCache:
    """An unquantized transformers DynamicCache for `model` (states kept in the model's dtype)."""
    return DynamicCache(config=model.config)


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, token_ids: torch.Tensor,
                        cache_factory: Optional[CacheFactory] = None, *, window: int = 1024, step: int | None = 32,
                        max_windows: Optional[int] = None, batch_size: int = 1,
                        progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` on `token_ids` with every window going through a fresh cache.

    token_ids:     [N] LongTensor, cut into floor(N / window) non-overlapping windows (tail dropped).
    cache_factory: model -> transformers Cache, called once per window (per batch of windows);
                   None gives an unquantized DynamicCache.
    window, step:  window length and tokens per forward call through the cache; step=None is one forward per
                   window without a KV cache (cache_factory unused): what weight quantization is measured with.
    max_windows:   evaluate at most this many windows (the first ones).
    batch_size:    windows fed side by side (batch > 1 needs a cache that supports batches; it changes
                   only the speed, never which predictions are scored).
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (one prediction needs two tokens), got {window}")
    if step is not None and step < 1:
        raise ValueError(f"step must be >= 1 or None, got {step}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    factory = cache_factory or default_cache_factory
    device = next(model.parameters()).device
    if token_ids.dim() != 1 or token_ids.dtype != torch.long:
        raise ValueError(f"token_ids must be a 1-D LongTensor, got shape {tuple(token_ids.shape)} "
                         f"and dtype {token_ids.dtype}")
    windows = torch.stack(cut_windows(token_ids, window, keep_tail=False, max_windows=max_windows)).to(device)

    t0 = time.perf_counter()
    nll_sum = 0.0
    sizes: list[float] = []
    compressed: list[int] = []
    with progress_bar(total=len(windows), desc=desc, unit="window", enabled=progress, leave=False) as bar:
        n_batches = -(-len(windows) // batch_size)

        def heartbeat(done: int, n: int) -> None:  # a line every interval inside a long batch, not only after it
            bar.set_postfix_str(f"batch {first // batch_size + 1}/{n_batches}, step {done}/{n}")
            bar.update(0)

        for first in range(0, len(windows), batch_size):
            ids = windows[first: first + batch_size]
            cache = None if step is None else factory(model)
            nll_sum += float(window_nll(model, ids, cache, step, on_step=heartbeat).sum())
            bar.set_postfix_str("")
            nbytes = cache_nbytes(cache)
            if nbytes is not None:
                sizes.append(nbytes / len(ids))
            counted = getattr(cache, "compressed_values", None)
            if callable(counted):
                compressed.append(counted() // len(ids))
            close = getattr(cache, "close", None)
            if callable(close):  # caches that hook the model (pre-RoPE keys) unhook here
                close()
            del cache
            bar.update(len(ids))
    n_tokens = len(windows) * (window - 1)
    nll = nll_sum / n_tokens
    kv_bytes = sum(sizes) / len(sizes) if sizes else None
    result = PerplexityResult(
        ppl=math.exp(nll), nll=nll, n_tokens=n_tokens, n_windows=len(windows), kv_bytes=kv_bytes,
        bits_per_value=None if kv_bytes is None else 8.0 * kv_bytes / kv_values(model.config, 1, window),
        seconds=time.perf_counter() - t0, compressed_values=min(compressed) if compressed else None)
    log.info("%s: ppl %.4f over %d predictions (%s of %d tokens, step %s) in %.1f s", desc, result.ppl, n_tokens,
             count(len(windows), "window"), window, "none (one pass)" if step is None else step, result.seconds)
    return result
