"""Perplexity under a KV cache: the evaluation protocol of DESIGN.md section 3.

The token stream is cut into non-overlapping windows of `window` tokens. Each window starts from a fresh
cache and is fed through the model `step` tokens at a time, so every token after the first step attends
to keys and values that went through the cache (and its quantizer) rather than to exact states. Every
next-token prediction inside the window is scored: window - 1 predictions per window.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from transformers.cache_utils import DynamicCache

from aquakv.evaluation.nll import window_nll
from aquakv.evaluation.windows import cut_windows

log = logging.getLogger(__name__)

CacheFactory = Callable[[torch.nn.Module], object]


@dataclass
class PerplexityResult:
    """Outcome of `evaluate_perplexity`.

    ppl:            exp(nll).
    nll:            mean negative log-likelihood per predicted token, in nats.
    n_tokens:       number of scored predictions (n_windows * (window - 1)).
    n_windows:      number of windows evaluated.
    kv_bytes:       bytes the cache held after a full window (per window), or None when the cache does not
                    report it.
    bits_per_value: 8 * kv_bytes / (key and value elements of a full window): storage bits per cached value,
                    everything included (codes, scales, zero points, fp16 sinks and buffers); None likewise.
    seconds:        wall time of the evaluation.
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    kv_bytes: Optional[float] = None
    bits_per_value: Optional[float] = None
    seconds: float = 0.0


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
    nbytes = getattr(cache, "nbytes", None)
    if nbytes is not None:
        return nbytes() if callable(nbytes) else nbytes
    if not isinstance(cache, DynamicCache):
        return None
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


def default_cache_factory(model: torch.nn.Module) -> DynamicCache:
    """An unquantized transformers DynamicCache for `model` (states kept in the model's dtype)."""
    return DynamicCache(config=model.config)


def _size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "n/a"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def format_table(rows: Sequence[tuple[str, PerplexityResult]], baseline: Optional[float] = None,
                 baseline_name: str = "fp16") -> str:
    """A Markdown table: method | bits/value | KV bytes | perplexity | vs <baseline_name> | seconds.

    KV bytes are per window (one sequence of `window` tokens). baseline: perplexity the last column is relative to.
    """
    lines = [f"| method | bits/value | KV bytes | perplexity | vs {baseline_name} | eval time |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        bits = "n/a" if r.bits_per_value is None else f"{r.bits_per_value:.2f}"
        rel = "" if baseline is None else f"{100 * relative_increase(r.ppl, baseline):+.2f}%"
        lines.append(f"| {name} | {bits} | {_size(r.kv_bytes)} | {r.ppl:.3f} | {rel} | {_seconds(r.seconds)} |")
    return "\n".join(lines)


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

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    nll_sum = 0.0
    sizes: list[float] = []
    with tqdm(total=len(windows), desc=desc, unit="window", disable=not progress, leave=False) as bar:
        for first in range(0, len(windows), batch_size):
            ids = windows[first: first + batch_size]
            cache = None if step is None else factory(model)
            nll_sum += float(window_nll(model, ids, cache, step).sum())
            nbytes = cache_nbytes(cache)
            if nbytes is not None:
                sizes.append(nbytes / len(ids))
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
        seconds=time.perf_counter() - t0)
    log.info("%s: ppl %.4f over %d tokens (%d windows of %d, step %d) in %.1f s", desc, result.ppl, n_tokens,
             len(windows), window, step, result.seconds)
    return result
