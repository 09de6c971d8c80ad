"""Training windows for PV-Tuning and the order they are drawn in: a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted one would."""
from __future__ import annotations

import torch

from aquakv.evaluation.windows import cut_windows


def _ids(data, tokenizer, what: str):
    if isinstance(data, str) or (isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data)):
        if tokenizer is None:
            raise ValueError(f"pv_tune: {what} is text; pass tokenizer= to turn it into token ids")
        from aquakv.data import tokenize

        return tokenize(tokenizer, [data] if isinstance(data, str) else list(data))
    return data


def as_windows(data, tokenizer, window: int, what: str) -> torch.Tensor:
    """data (1-D ids, a list of them, [N, window] ids, or texts with a tokenizer) -> LongTensor [N, window] of
    non-overlapping full windows (each sequence's short tail is dropped)."""
    ids = _ids(data, tokenizer, what)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        if ids.shape[1] != window:
            raise ValueError(f"pv_tune: {what} holds windows of {ids.shape[1]} tokens, window is {window}")
        return ids.long()
    try:
        return torch.stack(cut_windows(ids, window, keep_tail=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"pv_tune: {what}: {e}") from None


def eval_ids(data, tokenizer) -> torch.Tensor:
    """Held-out data (1-D ids or texts) as one 1-D LongTensor, the form evaluate_perplexity takes."""
    ids = _ids(data, tokenizer, "eval_data")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
        raise ValueError("pv_tune: eval_data must be a 1-D tensor of token ids or text (with tokenizer=)")
    return ids.long()


class BatchSchedule:
    """Window indices of step t: a seeded permutation per epoch, read batch_size at a time across epochs."""

    def __init__(self, n_windows: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_windows, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}  # one epoch at a time is all a step needs
        return self._perms[epoch]

    def batch(self, step: int) -> torch.Tensor:
        first = step * self.batch_size
        return torch.stack([self._perm(i // self.n)[i % self.n] for i in range(first, first + self.batch_size)])
