"""Token streams cut into windows: the one cutter that calibration, perplexity and sensitivities share."""
from __future__ import annotations

from typing import Sequence

import torch


def cut_windows(seqs: torch.Tensor | Sequence[torch.Tensor], window: int, *, keep_tail: bool, min_tokens: int = 1,
                max_windows: int | None = None, spread: bool = False) -> list[torch.Tensor]:
    """Consecutive, non-overlapping windows of `window` tokens from each 1-D integer sequence, in order.

    keep_tail: a sequence's last, shorter piece becomes a window of its own (calibration: every token counts) or
        is dropped (evaluation: every window scores the same number of predictions).
    min_tokens: windows with fewer tokens are dropped.
    max_windows: keep this many: the first ones, or with spread=True ones spread evenly over all (deterministic).
    Returns 1-D LongTensors (views of the input where it is already int64); raises ValueError when none is left.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if isinstance(seqs, torch.Tensor):
        seqs = [seqs]
    out: list[torch.Tensor] = []
    for i, s in enumerate(seqs):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.is_floating_point() or s.is_complex():
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise TypeError(f"data[{i}] must be a 1-D integer tensor of token ids, got {got}")
        pieces = s.long().split(window)
        out += [w for w in pieces if (keep_tail or w.numel() == window) and w.numel() >= min_tokens]
    if not out:
        longest = max((s.numel() for s in seqs), default=0)
        if keep_tail:
            raise ValueError(f"no window holds at least {min_tokens} tokens (the longest sequence has {longest})")
        raise ValueError(f"the longest sequence has {longest} tokens, fewer than one window of {window}")
    if max_windows is not None and max_windows < len(out):
        out = [out[(i * len(out)) // max_windows] for i in range(max_windows)] if spread else out[:max_windows]
    return out
