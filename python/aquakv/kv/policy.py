"""The chunking policy shared by every compressed KV cache of the package, as a transformers 5.x `Cache`; codecs
(`aquakv.kv.codec.KVCodec`) compress the chunks it hands them.

Per layer the policy keeps
  sinks:  the first `sinks` tokens, post-RoPE, in the storage dtype (never quantized: attention sinks);
  store:  a codec object holding every quantized token (chunks appended in order, never re-quantized);
  buffer: the newest tokens, post-RoPE, in the storage dtype, until it holds >= `buffer` tokens; then it is
          encoded once as a chunk. The forward that flushes still attends to the exact states; the quantized
          ones are used from the next forward on.
Every layer holds the same token layout, so layer l's chunk can be predicted from layer l-1's reconstruction of
the same tokens, which the cache keeps transiently from the previous `update` call of the same forward.
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from aquakv.kv.codec import KV, KVCodec
from aquakv.kv.rope import RotaryTracker, rotate, unrotate


class _ChunkedLayer(CacheLayerMixin):
    """State of one layer; the cache drives it (`ChunkedKVCache.update`), the layer answers length queries."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.clear()

    def clear(self) -> None:
        self.sink_k = self.sink_v = None  # [B, H, S, D] post-RoPE, storage dtype
        self.buf_k = self.buf_v = None  # [B, H, Tb, D] post-RoPE, storage dtype
        self.store = None  # codec store of the quantized tokens
        self.num_sinks = self.num_quantized = self.num_buffered = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.num_heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a _ChunkedLayer is updated through its ChunkedKVCache")

    def get_seq_length(self) -> int:
        return self.num_sinks + self.num_quantized + self.num_buffered

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.clear()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.sink_k, self.sink_v, self.buf_k, self.buf_v) if t is not None]


def _on(pair: KV | None, device: torch.device) -> KV | None:
    """A pair of tensors on `device` (no copy when already there)."""
    return None if pair is None else (pair[0].to(device), pair[1].to(device))


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


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
        super().__init__(layers=[_ChunkedLayer() for _ in range(cfg.num_hidden_layers)])
        self.codec = codec
        self.sinks = sinks
        self.buffer = buffer
        model_dtype = next(model.parameters()).dtype
        self.storage_dtype = storage_dtype or (torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16)
        self.tracker = RotaryTracker(model, rotary) if codec.pre_rope else None
        self.positions: torch.Tensor | None = None  # [B, T] int32, every cached token's rotary position
        self._prev: tuple[int, KV] | None = None  # (layer, reconstruction of its quantized tokens) in this forward
        self._rope: tuple[tuple[int, int], KV] | None = None  # cos/sin of the quantized tokens in this forward

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
        """key_states (post-RoPE), value_states: [B, H, T, D] -> all keys and values [B, H, T_total, D]."""
        layer = self.layers[layer_idx]
        batch, _, length, _ = key_states.shape
        who = f"{type(self).__name__}.update(layer {layer_idx})"
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        elif batch != layer.batch:
            raise ValueError(f"{who}: batch size {batch} but the cache holds batch {layer.batch}; reset() it first")
        if layer_idx == 0:
            self._prev = self._rope = None
            if self.tracker is not None:
                new_pos = self.tracker.take(batch, length, who).to(torch.int32)
                self.positions = new_pos if self.positions is None else torch.cat([self.positions, new_pos], dim=1)
        if self.tracker is not None and self.positions.shape[1] != layer.get_seq_length() + length:
            raise RuntimeError(f"{who}: {layer.get_seq_length()} cached + {length} new tokens but positions for "
                               f"{self.positions.shape[1]}: layers must be updated in order 0..L-1 in every forward")

        k_new = key_states.to(self.storage_dtype)
        v_new = value_states.to(self.storage_dtype)
        take = min(self.sinks - layer.num_sinks, length)
        if take > 0:
            layer.sink_k, layer.sink_v = _cat(layer.sink_k, k_new[:, :, :take]), _cat(layer.sink_v, v_new[:, :, :take])
            layer.num_sinks += take
            k_new, v_new = k_new[:, :, take:], v_new[:, :, take:]
        if k_new.shape[2]:
            layer.buf_k, layer.buf_v = _cat(layer.buf_k, k_new), _cat(layer.buf_v, v_new)
            layer.num_buffered += k_new.shape[2]

        # What attention reads, assembled in place: sinks | quantized tokens as decoded before this call's flush |
        # the buffer (the tokens this call flushes are returned exact).
        sinks, old, buffered = layer.num_sinks, layer.num_quantized, layer.num_buffered
        keys = key_states.new_empty((batch, layer.num_heads, sinks + old + buffered, layer.head_dim))
        values = value_states.new_empty(keys.shape)
        if sinks:
            keys[:, :, :sinks], values[:, :, :sinks] = layer.sink_k, layer.sink_v
        if buffered:
            keys[:, :, sinks + old:], values[:, :, sinks + old:] = layer.buf_k, layer.buf_v
        flush = buffered >= self.buffer
        if old or flush:
            self._update_quantized(layer_idx, layer, flush, keys[:, :, sinks:sinks + old],
                                   values[:, :, sinks:sinks + old])
        return keys, values

    def _cos_sin(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, stop - start, D] of cached tokens; every layer of a forward asks for the same range, so the
        first answer is kept until the next forward (transient, like the previous layer's reconstruction)."""
        if self._rope is None or self._rope[0] != (start, stop):
            self._rope = ((start, stop), self.tracker.cos_sin(self.positions[:, start:stop]))
        return self._rope[1]

    def _previous(self, layer_idx: int, num_tokens: int) -> KV | None:
        if not self.codec.needs_previous_layer or layer_idx == 0:
            return None
        if self._prev is None or self._prev[0] != layer_idx - 1 or self._prev[1][0].shape[2] != num_tokens:
            got = "nothing" if self._prev is None else f"layer {self._prev[0]} with {self._prev[1][0].shape[2]} tokens"
            raise RuntimeError(f"{type(self).__name__}: layer {layer_idx} needs layer {layer_idx - 1}'s reconstruction "
                               f"of {num_tokens} tokens from this forward, found {got}")
        return self._prev[1]

    def _update_quantized(self, layer_idx: int, layer: _ChunkedLayer, flush: bool, out_k: torch.Tensor,
                          out_v: torch.Tensor) -> None:
        """Decode the layer's store into out_k / out_v ([B, H, num_quantized, D] views of what attention reads; keys
        re-rotated), encode the buffer as a new chunk if `flush`, and keep this layer's reconstruction of all its
        quantized tokens for the next layer."""
        codec = self.codec
        start = layer.num_sinks
        n_old, n_new = layer.num_quantized, layer.num_buffered if flush else 0
        prev = _on(self._previous(layer_idx, n_old + n_new), layer.device)  # layers may sit on several GPUs
        cos = sin = None
        if codec.pre_rope:
            cos, sin = _on(self._cos_sin(start, start + n_old + n_new), layer.device)
        hat_k, hat_v = [], []
        if n_old:
            pk = None if prev is None else (prev[0][:, :, :n_old], prev[1][:, :, :n_old])
            k_hat, v_hat = codec.decode(layer_idx, layer.store, pk)
            hat_k.append(k_hat)
            hat_v.append(v_hat)
        if flush:
            pk = None if prev is None else (prev[0][:, :, n_old:], prev[1][:, :, n_old:])
            k_in = layer.buf_k.float()
            if codec.pre_rope:
                k_in = unrotate(k_in, cos[:, n_old:], sin[:, n_old:])
            chunk, k_hat_new, v_hat_new = codec.encode(layer_idx, k_in, layer.buf_v.float(), pk)
            layer.store = codec.append(layer.store, chunk)
            hat_k.append(k_hat_new)
            hat_v.append(v_hat_new)
        if codec.needs_previous_layer:
            cat_k = hat_k[0] if len(hat_k) == 1 else torch.cat(hat_k, dim=2)
            cat_v = hat_v[0] if len(hat_v) == 1 else torch.cat(hat_v, dim=2)
            self._prev = (layer_idx, (cat_k, cat_v))
        if flush:
            layer.num_quantized += n_new
            layer.buf_k = layer.buf_v = None
            layer.num_buffered = 0
        if not n_old:
            return
        if codec.pre_rope:
            rotate(hat_k[0], cos[:, :n_old], sin[:, :n_old], out=out_k)
        else:
            out_k.copy_(hat_k[0])
        out_v.copy_(hat_v[0])

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype = torch.float32) -> list[KV]:
        """Every layer's keys (post-RoPE) and values [B, H, T, D] as the next forward would read them.

        For inspection and error measurements (e.g. against a DynamicCache): it holds all layers at once, which
        the cache itself never does.
        """
        out, prev = [], None
        for layer_idx, layer in enumerate(self.layers):
            parts = []
            if layer.num_sinks:
                parts.append((layer.sink_k, layer.sink_v))
            if layer.num_quantized:
                k_hat, v_hat = self.codec.decode(layer_idx, layer.store, _on(prev, layer.device) if layer_idx else None)
                prev = (k_hat, v_hat)
                if self.codec.pre_rope:
                    start = layer.num_sinks
                    k_hat = rotate(k_hat, *_on(self._cos_sin(start, start + layer.num_quantized), layer.device))
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
    def _select_batch(self, index: torch.Tensor) -> None:
        self._prev = self._rope = None
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            idx = index.to(layer.device)
            layer.batch = idx.shape[0]
            for name in ("sink_k", "sink_v", "buf_k", "buf_v"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, idx))
            if layer.store is not None:
                layer.store = self.codec.select_batch(layer.store, idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row i becomes old row beam_idx[i] (codes are reordered, never re-quantized)."""
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.layers[0].batch if self.layers[0].is_initialized else 0
        if batch:
            self._select_batch(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove tokens (a negative count, like DynamicCache); exact for every part."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        self._prev = self._rope = None
        total = self.get_seq_length()
        keep = max(total + tokens_to_remove, 0)
        if tokens_to_remove == 0 or total == 0:
            return
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            n_sink = min(keep, layer.num_sinks)
            n_quant = min(keep - n_sink, layer.num_quantized)
            n_buf = keep - n_sink - n_quant
            layer.sink_k, layer.sink_v = _keep(layer.sink_k, n_sink), _keep(layer.sink_v, n_sink)
            layer.buf_k, layer.buf_v = _keep(layer.buf_k, n_buf), _keep(layer.buf_v, n_buf)
            if n_quant < layer.num_quantized:
                layer.store = self.codec.truncate(layer.store, n_quant) if n_quant else None
            layer.num_sinks, layer.num_quantized, layer.num_buffered = n_sink, n_quant, n_buf
        if self.positions is not None:
            self.positions = self.positions[:, :keep] if keep else None

    def reset(self) -> None:
        """Drop every cached token (the hook stays: the cache can be reused)."""
        self._prev = self._rope = None
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


def _keep(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return t[:, :, :n] if t is not None and n else None
