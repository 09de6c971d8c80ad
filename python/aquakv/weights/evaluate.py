"""Plain windowed perplexity for weight experiments: each window is one forward pass, no KV cache.

(The KV-cache protocol of DESIGN §3, 32-token steps through a cache, lives in aquakv.evaluation; weight
quantization changes no cache, so one pass per window measures the same thing much faster.)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from aquakv.evaluation.nll import window_nll


def split_windows(ids: torch.Tensor, length: int, max_windows: int | None = None) -> torch.Tensor:
    """1-D LongTensor -> [count, length] of consecutive non-overlapping windows (the tail shorter than a
    window is dropped; a text shorter than one window gives one window of its full length)."""
    if ids.dim() != 1:
        raise ValueError(f"split_windows: ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if length < 2:
        raise ValueError(f"split_windows: window length must be >= 2, got {length}")
    if ids.numel() < 2:
        raise ValueError(f"split_windows: need at least 2 tokens, got {ids.numel()}")
    count = ids.numel() // length
    if count == 0:
        return ids[None].clone()
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * length].view(count, length)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean NLL per predicted token, nats
    tokens: int  # predicted tokens
    windows: int
    seconds: float

    def __str__(self) -> str:
        return f"ppl {self.perplexity:.4f} (nll {self.nll:.5f}, {self.windows} windows, {self.tokens} tokens, {self.seconds:.0f} s)"


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 1024, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens of the 1-D ids."""
    start = time.perf_counter()
    windows = split_windows(ids, window, max_windows)
    total = 0.0
    for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress, unit="batch"):
        total += float(window_nll(model, batch.to(next(model.parameters()).device)).sum())
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / tokens
    return PerplexityResult(math.exp(nll), nll, tokens, windows.shape[0], time.perf_counter() - start)
