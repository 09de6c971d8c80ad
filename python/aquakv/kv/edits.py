"""Batch and length edits of a `aquakv.kv.policy.ChunkedKVCache` (beam search, assisted decoding, reuse): every
argument is checked before anything changes, codes are moved or cut, never re-quantized, and a failure half-way
marks the cache unusable until reset().
"""
from __future__ import annotations

import torch

from aquakv.kv.codec import checked_batch_index, compact
from aquakv.kv.window import WindowLayer


class CacheEdits:
    """Mixed into ChunkedKVCache: needs its layers, codec, positions, _check_usable and the transient fields."""

    def _edit(self, who: str, edit) -> None:
        """Run `edit` (arguments already checked); a failure half-way leaves layers that disagree: mark it."""
        self._check_usable(who)
        self._prev = self._rope = self._deferred = None
        try:
            edit()
        except BaseException as error:
            self._broken = f"{who} failed half-way ({type(error).__name__}: {error})"
            raise

    def _batch(self) -> int | None:
        if self.layers[0].is_initialized:
            return self.layers[0].batch
        return None if self.positions is None else self.positions.shape[0]

    def _select_batch(self, index, who: str) -> None:
        self._check_usable(who)
        index = checked_batch_index(index, self._batch(), who)
        self._edit(who, lambda: self._apply_select(index))

    def _apply_select(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.select_rows(index.to(layer.device), self.codec)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row i becomes old row beam_idx[i] (codes are reordered, never re-quantized).
        A bad index (not 1-D integers within the batch) raises before anything changes."""
        self._select_batch(beam_idx, f"{type(self).__name__}.reorder_cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices, f"{type(self).__name__}.batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        who = f"{type(self).__name__}.batch_repeat_interleave"
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"{who}: repeats must be a positive integer, got {repeats!r}")
        batch = self._batch()
        if batch:
            self._select_batch(torch.arange(batch).repeat_interleave(repeats), who)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove tokens (a negative count, like DynamicCache); exact for every part.
        What is kept is copied, so the cropped tokens' bytes are freed."""
        who = f"{type(self).__name__}.crop"
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(f"{who}: pass a negative number of tokens to remove, got {tokens_to_remove!r}")
        self._check_usable(who)
        total = self.get_seq_length()
        if tokens_to_remove == 0 or total == 0:
            return
        keep = max(total + tokens_to_remove, 0)
        for layer in self.layers:
            if isinstance(layer, WindowLayer) and layer.is_initialized:
                layer.check_keep_first(keep, who)
        self._edit(who, lambda: self._apply_crop(keep))

    def _apply_crop(self, keep: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.keep_first(keep, self.codec)
        if self.positions is not None:
            self.positions = compact(self.positions[:, :keep]) if keep else None

    def reset(self) -> None:
        """Drop every cached token (the hook stays: the cache can be reused); also makes an unusable cache usable."""
        self._prev = self._rope = self._deferred = None
        self._broken = None
        self.positions = None
        for layer in self.layers:
            layer.reset()
