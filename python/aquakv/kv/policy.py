"""The chunking policy shared by every compressed KV cache of the package, as a transformers 5.x `Cache`; codecs
(`aquakv.kv.codec.KVCodec`) compress the chunks it hands them.

Per layer the policy keeps
  sinks:  the first `sinks` tokens, post-RoPE, in the storage dtype (never quantized: attention sinks);
  store:  a codec object holding every quantized token (chunks appended in order, never re-quantized);
  buffer: the newest tokens, post-RoPE, in the storage dtype, until it holds >= `buffer` tokens; then it is
          encoded once as a chunk. The forward that flushes still attends to the exact states; the quantized
          ones are used from the next forward on.
Every layer holds the same token layout, so layer l's chunk can be predicted from layer l-1's reconstruction of
the same tokens, which the cache keeps transiently from the previous `update` call of the same forward (dropped
after the last layer). An update completes or leaves its layer as it was; a forward that fails half-way leaves a
cache that refuses every call until `reset()`. More in docs/kv_cache.md (in this repository).
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from aquakv.kv.codec import (
    KV,
    ChunkedLayer,
    KVCodec,
    _cat,
    checked_batch_index,
    compact,
)
from aquakv.kv.rope import RotaryTracker, rotate, unrotate


def _on(pair: KV | None, device: torch.device) -> KV | None:
    """A pair of tensors on `device` (no copy when already there)."""
    return None if pair is None else (pair[0].to(device), pair[1].to(device))


class ChunkedKVCache(Cache):
    """A transformers Cache that keeps attention sinks and a recent buffer exact and compresses everything else
    chunk by chunk with `codec` (see the module docstring and docs/kv_cache.md).

    model: the transformers model this cache serves (its rotary module is hooked when codec.pre_rope).
    sinks: first tokens kept exact; buffer: flush threshold of the exact recent buffer (tokens).
    storage_dtype: dtype of sinks and buffer; default fp16 (bf16 for bf16 models, whose states may exceed fp16).
    Remove the rotary hook with `close()` or `with cache: ...`; it also goes when the cache is garbage-collected.
    """

    def __init__(self, model, codec: KVCodec, *, sinks: int = 4, buffer: int = 128,
                 storage_dtype: torch.dtype | None = None, rotary: torch.nn.Module | None = None):
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        cfg = model.config.get_text_config(decoder=True)
        super().__init__(layers=[ChunkedLayer() for _ in range(cfg.num_hidden_layers)])
        self.codec = codec
        self.sinks = sinks
        self.buffer = buffer
        model_dtype = next(model.parameters()).dtype
        self.storage_dtype = storage_dtype or (torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16)
        self.tracker = RotaryTracker(model, rotary) if codec.pre_rope else None
        self.positions: torch.Tensor | None = None  # [B, T] int32, every cached token's rotary position
        self._prev: tuple[int, KV] | None = None  # (layer, reconstruction of its quantized tokens) in this forward
        self._rope: tuple[tuple[int, int], KV] | None = None  # cos/sin of the quantized tokens in this forward
        self._forward_changed = False  # some layer took the tokens of the forward in progress
        self._broken: str | None = None  # why the layers disagree after a failure; reset() clears it

    # ---- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the rotary hook; the cache can no longer be updated (it may still be read for lengths)."""
        if self.tracker is not None:
            self.tracker.close()

    def __enter__(self) -> "ChunkedKVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the update ----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> KV:
        """key_states (post-RoPE), value_states: [B, H, T, D] -> all keys and values [B, H, T_total, D].

        Everything that can fail (checks, decoding, encoding the flushed chunk) runs before the layer changes, so a
        failing update leaves its layer as it was; if an earlier layer of the same forward already took the new
        tokens, the cache is marked unusable (layers disagree) and every later call says to reset() it.
        """
        who = f"{type(self).__name__}.update(layer {layer_idx})"
        self._check_usable(who)
        if layer_idx == 0:
            self._forward_changed = False
        try:
            return self._update(key_states, value_states, layer_idx, who)
        except BaseException as error:
            if self._forward_changed:
                self._broken = (f"{who} failed after this forward had already changed earlier layers "
                                f"({type(error).__name__}: {error})")
            raise

    def _check_usable(self, who: str) -> None:
        if self._broken is not None:
            raise RuntimeError(f"{who}: this cache is unusable: {self._broken}. Call reset() to use it again")

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, who: str) -> KV:
        layer = self.layers[layer_idx]
        batch, heads, length, head_dim = key_states.shape
        if layer.is_initialized and batch != layer.batch:
            raise ValueError(f"{who}: batch size {batch} but the cache holds batch {layer.batch}; reset() it first")
        positions = self.positions
        if layer_idx == 0:
            lengths = [lay.get_seq_length() for lay in self.layers]
            if len(set(lengths)) > 1:
                self._broken = f"an earlier forward did not update every layer (layer lengths {lengths})"
                self._check_usable(who)
            self._prev = self._rope = None
            if self.tracker is not None:
                new_pos = self.tracker.take(batch, length, who).to(torch.int32)
                positions = new_pos if positions is None else torch.cat([positions, new_pos], dim=1)
        elif layer.get_seq_length() + length != self.layers[0].get_seq_length():
            raise RuntimeError(f"{who}: {layer.get_seq_length()} cached + {length} new tokens but layer 0 holds "
                               f"{self.layers[0].get_seq_length()}: layers must be updated in order 0..L-1 in every "
                               f"forward")

        # The layer's next state, built aside: nothing below changes the layer until every step has succeeded.
        k_new, v_new = key_states.to(self.storage_dtype), value_states.to(self.storage_dtype)
        take = max(min(self.sinks - layer.num_sinks, length), 0)
        sink_k, sink_v, buf_k, buf_v = layer.sink_k, layer.sink_v, layer.buf_k, layer.buf_v
        if take:
            sink_k, sink_v = _cat(sink_k, k_new[:, :, :take]), _cat(sink_v, v_new[:, :, :take])
        if length > take:
            buf_k, buf_v = _cat(buf_k, k_new[:, :, take:]), _cat(buf_v, v_new[:, :, take:])
        sinks, old, buffered = layer.num_sinks + take, layer.num_quantized, layer.num_buffered + length - take

        # What attention reads: sinks | quantized tokens as decoded before this call's flush | the buffer (the
        # tokens this call flushes are returned exact).
        keys = key_states.new_empty((batch, heads, sinks + old + buffered, head_dim))
        values = value_states.new_empty(keys.shape)
        if sinks:
            keys[:, :, :sinks], values[:, :, :sinks] = sink_k, sink_v
        if buffered:
            keys[:, :, sinks + old:], values[:, :, sinks + old:] = buf_k, buf_v
        flush = buffered >= self.buffer
        store, prev = layer.store, None
        if old or flush:
            store, prev = self._update_quantized(layer_idx, layer.store, positions, sinks, old, buffered if flush else 0,
                                                 buf_k, buf_v, keys[:, :, sinks:sinks + old],
                                                 values[:, :, sinks:sinks + old])

        # Commit.
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        self._forward_changed = True
        layer.sink_k, layer.sink_v, layer.num_sinks = sink_k, sink_v, sinks
        if flush:
            layer.store, layer.num_quantized, buf_k, buf_v, buffered = store, old + buffered, None, None, 0
        layer.buf_k, layer.buf_v, layer.num_buffered = buf_k, buf_v, buffered
        self.positions = positions
        # The previous layer's reconstruction and the cos/sin serve only the forward in progress.
        last = layer_idx == len(self.layers) - 1
        self._prev = None if last or prev is None else (layer_idx, prev)
        self._rope = None if last else self._rope
        self._forward_changed = not last  # a complete forward leaves nothing half-done
        return keys, values

    def _cos_sin(self, positions: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, stop - start, D] of cached tokens; every layer of a forward asks for the same range, so the
        first answer is kept until the end of the forward (transient, like the previous layer's reconstruction)."""
        if self._rope is None or self._rope[0] != (start, stop):
            self._rope = ((start, stop), self.tracker.cos_sin(positions[:, start:stop]))
        return self._rope[1]

    def _previous(self, layer_idx: int, num_tokens: int) -> KV | None:
        if not self.codec.needs_previous_layer or layer_idx == 0:
            return None
        if self._prev is None or self._prev[0] != layer_idx - 1 or self._prev[1][0].shape[2] != num_tokens:
            got = "nothing" if self._prev is None else f"layer {self._prev[0]} with {self._prev[1][0].shape[2]} tokens"
            raise RuntimeError(f"{type(self).__name__}: layer {layer_idx} needs layer {layer_idx - 1}'s reconstruction "
                               f"of {num_tokens} tokens from this forward, found {got}")
        return self._prev[1]

    def _update_quantized(self, layer_idx: int, store, positions: torch.Tensor | None, start: int, n_old: int,
                          n_new: int, buf_k: torch.Tensor | None, buf_v: torch.Tensor | None, out_k: torch.Tensor,
                          out_v: torch.Tensor) -> tuple[object, KV | None]:
        """Decode the layer's store into out_k / out_v ([B, H, n_old, D] views of what attention reads; keys
        re-rotated) and, if n_new, encode the buffer as a new chunk. Changes nothing of the layer.

        Returns (the store with the new chunk, this layer's reconstruction of all its quantized tokens for the next
        layer or None when the codec does not need it).
        """
        codec = self.codec
        device = out_k.device
        prev = _on(self._previous(layer_idx, n_old + n_new), device)  # layers may sit on several GPUs
        cos = sin = None
        if codec.pre_rope:
            cos, sin = _on(self._cos_sin(positions, start, start + n_old + n_new), device)
        hat_k, hat_v = [], []
        if n_old:
            pk = None if prev is None else (prev[0][:, :, :n_old], prev[1][:, :, :n_old])
            k_hat, v_hat = codec.decode(layer_idx, store, pk)
            if codec.pre_rope:
                rotate(k_hat, cos[:, :n_old], sin[:, :n_old], out=out_k)
            else:
                out_k.copy_(k_hat)
            out_v.copy_(v_hat)
            hat_k.append(k_hat)
            hat_v.append(v_hat)
        if n_new:
            pk = None if prev is None else (prev[0][:, :, n_old:], prev[1][:, :, n_old:])
            k_in = buf_k.float()
            if codec.pre_rope:
                k_in = unrotate(k_in, cos[:, n_old:], sin[:, n_old:])
            chunk, k_hat_new, v_hat_new = codec.encode(layer_idx, k_in, buf_v.float(), pk)
            store = codec.append(store, chunk)
            hat_k.append(k_hat_new)
            hat_v.append(v_hat_new)
        if not codec.needs_previous_layer:
            return store, None
        if len(hat_k) == 1:
            return store, (hat_k[0], hat_v[0])
        return store, (torch.cat(hat_k, dim=2), torch.cat(hat_v, dim=2))

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype = torch.float32) -> list[KV]:
        """Every layer's keys (post-RoPE) and values [B, H, T, D] as the next forward would read them.

        For inspection and error measurements (e.g. against a DynamicCache): it holds all layers at once, which
        the cache itself never does.
        """
        self._check_usable(f"{type(self).__name__}.materialize")
        out, prev, cos_sin = [], None, None
        for layer_idx, layer in enumerate(self.layers):
            parts = []
            if layer.num_sinks:
                parts.append((layer.sink_k, layer.sink_v))
            if layer.num_quantized:
                k_hat, v_hat = self.codec.decode(layer_idx, layer.store, _on(prev, layer.device) if layer_idx else None)
                prev = (k_hat, v_hat)
                if self.codec.pre_rope:
                    if cos_sin is None:  # every layer holds the same token layout: one range of positions
                        start = layer.num_sinks
                        cos_sin = self.tracker.cos_sin(self.positions[:, start:start + layer.num_quantized])
                    k_hat = rotate(k_hat, *_on(cos_sin, layer.device))
                parts.append((k_hat, v_hat))
            if layer.num_buffered:
                parts.append((layer.buf_k, layer.buf_v))
            if not parts:
                out.append((torch.empty(0), torch.empty(0)))
                continue
            out.append((torch.cat([p[0].to(dtype) for p in parts], dim=-2),
                        torch.cat([p[1].to(dtype) for p in parts], dim=-2)))
        return out

    # ---- batch and length edits (beam search, assisted decoding, reuse) -----------------------------------
    def _edit(self, who: str, edit) -> None:
        """Run `edit` (arguments already checked); a failure half-way leaves layers that disagree: mark it."""
        self._check_usable(who)
        self._prev = self._rope = None
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
        self._edit(who, lambda: self._apply_crop(max(total + tokens_to_remove, 0)))

    def _apply_crop(self, keep: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.keep_first(keep, self.codec)
        if self.positions is not None:
            self.positions = compact(self.positions[:, :keep]) if keep else None

    def reset(self) -> None:
        """Drop every cached token (the hook stays: the cache can be reused); also makes an unusable cache usable."""
        self._prev = self._rope = None
        self._broken = None
        self.positions = None
        for layer in self.layers:
            layer.reset()

    # ---- accounting ------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Every byte held: codec stores (codes, scales, ...), exact sinks and buffers, positions."""
        total = 0 if self.positions is None else self.positions.numel() * self.positions.element_size()
        for layer in self.layers:
            total += sum(t.numel() * t.element_size() for t in layer.tensors())
            if layer.store is not None:
                total += self.codec.nbytes(layer.store)
        return total

    def compressed_values(self) -> int:
        """Number of key and value entries held by codec stores (B * T_quantized * C * 2, summed over layers)."""
        total = 0
        for layer in self.layers:
            if layer.store is not None:
                total += 2 * layer.batch * layer.num_heads * layer.head_dim * layer.num_quantized
        return total

    def bits_per_value(self) -> float:
        """Bits per key/value entry of the compressed part (all codec stores); nan while nothing is compressed."""
        values = self.compressed_values()
        if not values:
            return math.nan
        return 8.0 * sum(self.codec.nbytes(layer.store) for layer in self.layers if layer.store is not None) / values

    def __repr__(self) -> str:
        n = self.get_seq_length()
        return (f"{type(self).__name__}({len(self.layers)} layers, {n} tokens, codec={type(self.codec).__name__}, "
                f"sinks={self.sinks}, buffer={self.buffer}, {self.nbytes()} bytes)")

