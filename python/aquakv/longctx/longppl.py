"""Perplexity over long windows (4096, 8192 tokens) at a cost two CPU cores can pay.

Protocol (docs/evaluation.md, with a chunked prefix): the token stream is cut into non-overlapping windows of
`window` tokens (tail dropped), each starting from a fresh cache. Window positions [0, prefill) are fed through
the cache `chunk` tokens per forward, positions [prefill, window) `step` tokens per forward. Every one of the
window - 1 next-token predictions is scored, the chunked ones too. A token inside the prefix attends exactly to the
earlier tokens of its own chunk (and to the cache's exact sinks and buffer) and to the compressed states of every
earlier chunk; a token of the stepped tail attends to the compressed states of everything but the last few dozen
tokens, as in decoding. So two figures are reported: the perplexity of all predictions, and `tail_ppl`, that of the
predictions made from positions prefill .. window - 2, the strict measurement. With prefill = 0 (or chunk = step)
this is exactly `aquakv.evaluation.nll.window_nll(..., step=step)`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from aquakv.evaluation.nll import token_nll
from aquakv.evaluation.perplexity import (
    CacheFactory,
    PerplexityResult,
    cache_nbytes,
    default_cache_factory,
    kv_values,
    relative_increase,
)
from aquakv.evaluation.windows import cut_windows
from aquakv.hf_compat import cache_kwargs
from aquakv.progress import progress as progress_bar

log = logging.getLogger(__name__)

DEFAULT_TAIL = 1024  # stepped tokens at the end of a window when prefill is not given


def feed_schedule(window: int, prefill: int, chunk: int, step: int) -> list[tuple[int, int]]:
    """[start, end) of every forward: `chunk`-token pieces up to `prefill`, then `step`-token pieces to `window`."""
    if window < 2:
        raise ValueError(f"window must be >= 2 (one prediction needs two tokens), got {window}")
    if not 0 <= prefill < window:
        raise ValueError(f"prefill must be in [0, window) = [0, {window}), got {prefill}")
    if chunk < 1 or step < 1:
        raise ValueError(f"chunk and step must be >= 1, got chunk {chunk}, step {step}")
    pieces = [(s, min(s + chunk, prefill)) for s in range(0, prefill, chunk)]
    return pieces + [(s, min(s + step, window)) for s in range(prefill, window, step)]


@torch.no_grad()
def scheduled_nll(model: torch.nn.Module, ids: torch.Tensor, cache, pieces: Sequence[tuple[int, int]],
                  on_piece: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Summed NLL (nats, float64 [B, len(pieces)]) of the next-token predictions made inside each piece of ids [B, T].

    pieces: consecutive [start, end) ranges covering 0..T, fed in order through `cache` (one forward each). A
    piece's column sums the predictions from its positions whose targets lie inside the window (the last position
    has none), computed as `window_nll` computes them, so uniform pieces reproduce it bit for bit.
    on_piece(done, n): called after each of the n forwards (progress inside a long window).
    """
    batch, window = ids.shape
    if not pieces or pieces[0][0] != 0 or pieces[-1][1] != window or any(
            a[1] != b[0] for a, b in zip(pieces, pieces[1:])) or any(s >= e for s, e in pieces):
        raise ValueError(f"scheduled_nll: pieces must be consecutive, non-empty and cover 0..{window}")
    out = torch.zeros(batch, len(pieces), dtype=torch.float64, device=ids.device)
    for i, (start, end) in enumerate(pieces):
        logits = model(input_ids=ids[:, start:end], use_cache=True, **cache_kwargs(model, cache)).logits
        n_pred = min(end, window - 1) - start
        if n_pred > 0:
            out[:, i] = token_nll(logits[:, :n_pred], ids[:, start + 1: start + 1 + n_pred]).double().sum(-1)
        if on_piece is not None:
            on_piece(i + 1, len(pieces))
    return out


def long_window_nll(model: torch.nn.Module, ids: torch.Tensor, cache=None, *, prefill: int, chunk: int,
                    step: int = 32, on_piece: Optional[Callable[[int, int], None]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(all, tail): summed NLL float64 [B] of all window - 1 predictions in ids [B, T], and of the predictions made
    from the stepped positions prefill .. T - 2 alone (see the module docstring for the protocol). on_piece: as in
    scheduled_nll."""
    pieces = feed_schedule(ids.shape[1], prefill, chunk, step)
    per_piece = scheduled_nll(model, ids, cache, pieces, on_piece)
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    tail = torch.zeros_like(total)
    for i, (start, _) in enumerate(pieces):  # accumulated in feeding order, as window_nll does
        total += per_piece[:, i]
        if start >= prefill:
            tail += per_piece[:, i]
    return total, tail


@dataclass
class LongPerplexityResult(PerplexityResult):
    """`PerplexityResult` over all predictions, plus the stepped tail alone and the protocol that produced it.

    tail_ppl, tail_nll, n_tail_tokens: the predictions from positions prefill .. window - 2 of every window.
    """

    tail_ppl: float = float("nan")
    tail_nll: float = float("nan")
    n_tail_tokens: int = 0
    window: int = 0
    prefill: int = 0
    chunk: int = 0
    step: int = 0


def default_prefill(window: int, chunk: int) -> int:
    """The whole window but its last DEFAULT_TAIL tokens (rounded down to whole chunks; 0 for short windows)."""
    return max(0, (window - DEFAULT_TAIL) // chunk * chunk)


@torch.no_grad()
def evaluate_long_perplexity(model: torch.nn.Module, token_ids: torch.Tensor,
                             cache_factory: Optional[CacheFactory] = None, *, window: int = 8192,
                             prefill: Optional[int] = None, chunk: int = 512, step: int = 32,
                             max_windows: Optional[int] = None, progress: bool = True,
                             desc: str = "long perplexity") -> LongPerplexityResult:
    """Perplexity of `model` on `token_ids` [N] over windows of `window` tokens, each through a fresh cache.

    prefill: window positions fed `chunk` tokens per forward (default: all but the last 1024, in whole chunks);
    the rest goes `step` tokens per forward. max_windows: the first this many windows. One window per forward batch.
    """
    if token_ids.dim() != 1 or token_ids.dtype != torch.long:
        raise ValueError(f"token_ids must be a 1-D LongTensor, got shape {tuple(token_ids.shape)} "
                         f"and dtype {token_ids.dtype}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    prefill = default_prefill(window, chunk) if prefill is None else prefill
    feed_schedule(window, prefill, chunk, step)  # checks the arguments before any work
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and window > limit:
        raise ValueError(f"window {window} exceeds the model's {limit} positions")
    factory = cache_factory or default_cache_factory
    device = next(model.parameters()).device
    windows = cut_windows(token_ids, window, keep_tail=False, max_windows=max_windows)

    t0 = time.perf_counter()
    nll_all = nll_tail = 0.0
    sizes: list[float] = []
    bar = progress_bar(windows, desc=desc, unit="window", enabled=progress, leave=False)

    def heartbeat(done: int, n: int) -> None:  # a line every interval inside a window of minutes, not only after it
        bar.set_postfix_str(f"forward {done}/{n}")
        bar.update(0)

    for ids in bar:
        cache = factory(model)
        try:
            total, tail = long_window_nll(model, ids[None].to(device), cache, prefill=prefill, chunk=chunk, step=step,
                                          on_piece=heartbeat)
            bar.set_postfix_str("")
            nbytes = cache_nbytes(cache)
        finally:
            close = getattr(cache, "close", None)
            if callable(close):
                close()
        nll_all += float(total.sum())
        nll_tail += float(tail.sum())
        if nbytes is not None:
            sizes.append(float(nbytes))
        del cache
    n_tokens = len(windows) * (window - 1)
    n_tail = len(windows) * (window - 1 - prefill)
    kv_bytes = sum(sizes) / len(sizes) if sizes else None
    result = LongPerplexityResult(
        ppl=math.exp(nll_all / n_tokens), nll=nll_all / n_tokens, n_tokens=n_tokens, n_windows=len(windows),
        kv_bytes=kv_bytes,
        bits_per_value=None if kv_bytes is None else 8.0 * kv_bytes / kv_values(model.config, 1, window),
        seconds=time.perf_counter() - t0, tail_ppl=math.exp(nll_tail / n_tail), tail_nll=nll_tail / n_tail,
        n_tail_tokens=n_tail, window=window, prefill=prefill, chunk=chunk, step=step)
    log.info("%s: ppl %.4f (tail %.4f) over %d windows of %d (prefill %d in chunks of %d, then steps of %d) in %.1f s",
             desc, result.ppl, result.tail_ppl, len(windows), window, prefill, chunk, step, result.seconds)
    return result


def format_long_ppl_table(rows: Sequence[tuple[str, LongPerplexityResult]], baseline: str = "fp16") -> str:
    """Markdown: cache | context | perplexity | vs baseline | tail perplexity | vs baseline | bits/value | time.

    Each row is compared with the row named `baseline` at the same window (no comparison where there is none).
    """
    base = {r.window: r for name, r in rows if name == baseline}
    lines = [f"| cache | context | perplexity | vs {baseline} | tail perplexity | tail vs {baseline} | bits/value "
             "| eval time |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        b = base.get(r.window)
        rel = "" if b is None else f"{100 * relative_increase(r.ppl, b.ppl):+.2f}%"
        rel_tail = "" if b is None else f"{100 * relative_increase(r.tail_ppl, b.tail_ppl):+.2f}%"
        bits = "n/a" if r.bits_per_value is None else f"{r.bits_per_value:.2f}"
        lines.append(f"| {name} | {r.window} | {r.ppl:.3f} | {rel} | {r.tail_ppl:.3f} | {rel_tail} | {bits} | "
                     f"{r.seconds:.0f} s |")
    return "\n".join(lines)
