"""What a `aquakv.kv.cache.ChunkedKVCache` keeps, and the one route between it and its codec.

Per layer (transformers cache layers):
  `ChunkedLayer`  a compressed layer: sinks | codec store | buffer, and its row and length edits;
  `LocalLayer`    an exact local layer of a hybrid model (`aquakv.kv.local_layers`): a rolling window.
Per forward:
  `ForwardState`  the transient state, in one object: the chain (the reconstruction the last compressed layer made
                  of the quantized tokens, which the next one is predicted from), the cos/sin of the quantized tokens
                  per RoPE kind, and the layer left for blockwise attention. It lives from layer 0's update to the
                  last layer's and is emptied by every edit.
The route: `serve_layer` is the only place the cache calls its codec (`aquakv.kv.codec.KVCodec`). It encodes a
flushed buffer and decodes the stored tokens through `decode_blocks`, which calls `KVCodec.decode` block by block:
materialized, one block of every stored token written into the tensors `update` returns; blockwise, `block_tokens`
at a time, when the attention that consumes the `DeferredLayer` reads them. `ChunkedKVCache.materialize` takes the
same route.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from aquakv.kv.attention import DeferredLayer
from aquakv.kv.codec import KV, KVCodec, compact
from aquakv.kv.rope import RotaryTracker, unrotate


# ---- per layer -----------------------------------------------------------------------------------------------------
class ChunkedLayer(CacheLayerMixin):
    """State of one compressed layer; the cache drives it (`ChunkedKVCache.update`), the layer answers lengths."""

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
        raise RuntimeError("a ChunkedLayer is updated through its ChunkedKVCache")

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

    def select_rows(self, index: torch.Tensor, codec: KVCodec) -> None:
        """Batch rows `index` (LongTensor [B'] on this layer's device, checked by the cache) of every part."""
        for name in ("sink_k", "sink_v", "buf_k", "buf_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))
        if self.store is not None:
            self.store = codec.select_batch(self.store, index)
        self.batch = index.shape[0]

    def keep_first(self, keep: int, codec: KVCodec) -> None:
        """Keep the first `keep` tokens (sinks first, then quantized, then buffered), as compact copies."""
        n_sink = min(keep, self.num_sinks)
        n_quant = min(keep - n_sink, self.num_quantized)
        n_buf = keep - n_sink - n_quant
        self.sink_k, self.sink_v = _first_tokens(self.sink_k, n_sink), _first_tokens(self.sink_v, n_sink)
        self.buf_k, self.buf_v = _first_tokens(self.buf_k, n_buf), _first_tokens(self.buf_v, n_buf)
        if n_quant < self.num_quantized:
            self.store = codec.truncate(self.store, n_quant) if n_quant else None
        self.num_sinks, self.num_quantized, self.num_buffered = n_sink, n_quant, n_buf


def append_tokens(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """a | b along the tokens, in a tensor of its own (b may be a slice of the model's update)."""
    return compact(b) if a is None else torch.cat([a, b], dim=-2)


def _first_tokens(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The first n tokens, copied: a view would keep the cropped tokens' bytes alive."""
    return compact(t[:, :, :n]) if t is not None and n else None


def checked_batch_index(index, batch: int | None, who: str) -> torch.Tensor:
    """index: 1-D integer rows of the current batch (may repeat) -> LongTensor; raises before anything changes."""
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{who}: the index must hold integers, got dtype {index.dtype}")
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"{who}: the index must be a non-empty 1-D tensor of batch rows, got shape "
                         f"{tuple(index.shape)}")
    if batch is not None:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= batch:
            raise IndexError(f"{who}: index values must be in [0, {batch}) for a batch of {batch}, got "
                             f"{lo if lo < 0 else hi}")
    return index.long()


class LocalLayer(DynamicSlidingWindowLayer):
    """An exact local layer: the last `sliding_window - 1` tokens (plus those of the forward in progress), post-RoPE,
    in the cache's storage dtype; transformers' own sliding-window layer (its mask sizes, its rolling), with the
    interface `aquakv.kv.cache.ChunkedKVCache` drives its layers through."""

    num_sinks = num_quantized = 0
    store = None

    def __init__(self, sliding_window: int, storage_dtype: torch.dtype):
        super().__init__(sliding_window=sliding_window)
        self.storage_dtype = storage_dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = self.keys.to(self.storage_dtype), self.values.to(self.storage_dtype)
        self.batch, self.num_heads, _, self.head_dim = key_states.shape

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store in the storage dtype; hand attention the model's dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = super().update(key_states.to(self.storage_dtype), value_states.to(self.storage_dtype))
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    @property
    def num_buffered(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 4 else self.keys.shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if isinstance(t, torch.Tensor)]

    def select_rows(self, index: torch.Tensor, codec=None) -> None:
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.batch = index.shape[0]

    def check_keep_first(self, keep: int, who: str) -> None:
        """`keep_first(keep)` is exact only while the layer still holds the last `sliding_window - 1` of those
        tokens (or all): once the window has rolled past, the tokens a crop would bring back into view are gone."""
        held, drop = self.num_buffered, self.cumulative_length - keep
        if held - drop < min(keep, self.sliding_window - 1):
            raise ValueError(f"{who}: cannot crop back to {keep} tokens: a sliding-window layer holds only the last "
                             f"{held} of {self.cumulative_length} tokens (window {self.sliding_window}), and the "
                             f"earlier ones the crop would bring back into the window are gone")

    def keep_first(self, keep: int, codec=None) -> None:
        """Keep the first `keep` tokens (checked by `check_keep_first`)."""
        self.check_keep_first(keep, "LocalLayer.keep_first")
        held, drop = self.num_buffered, self.cumulative_length - keep
        self.keys = self.keys[:, :, :held - drop].clone()
        self.values = self.values[:, :, :held - drop].clone()
        self.cumulative_length = keep

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


# ---- per forward, and the route to the codec ----------------------------------------------------------------------
def tokens(pair: KV | None, start: int, stop: int) -> KV | None:
    """Tokens [start, stop) of a pair of [B, H, T, D] tensors, as views."""
    return None if pair is None else (pair[0][:, :, start:stop], pair[1][:, :, start:stop])


def on_device(pair: KV | None, device: torch.device) -> KV | None:
    """A pair of tensors on `device` (no copy when already there)."""
    return None if pair is None else (pair[0].to(device), pair[1].to(device))


def new_chain(like: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> KV:
    """An empty chain for `num_tokens` tokens of a layer shaped like `like` [B, H, *, D]: [B, H, T, D] views of
    [B, T, H * D] rows (the layout the codecs' fused kernels read and write)."""
    b, h, _, d = like.shape
    rows = torch.empty((2, b, num_tokens, h * d), dtype=dtype, device=like.device)
    return tuple(r.view(b, num_tokens, h, d).transpose(1, 2) for r in rows)


@dataclass
class ForwardState:
    """The transient state of the forward in progress (see the module docstring).

    chain: (layer, its reconstruction [B, H, T_quantized, D] in the cache's chain_dtype) or None.
    rope: ((start, stop), {RoPE kind: (cos, sin) float32 [B, stop - start, R]}) or None.
    deferred: the DeferredLayer the last update left for blockwise attention, or None.
    changed: some layer already took this forward's tokens (a failure now leaves layers that disagree).
    """

    chain: tuple[int, KV] | None = None
    rope: tuple[tuple[int, int], dict] | None = None
    deferred: DeferredLayer | None = None
    changed: bool = False

    def clear(self) -> None:
        self.chain = self.rope = self.deferred = None
        self.changed = False

    def begin(self, tracker: RotaryTracker | None, positions: torch.Tensor | None, batch: int, length: int,
              who: str) -> torch.Tensor | None:
        """Layer 0 of a forward: nothing of the previous forward is kept; returns every cached token's positions
        [B, T] int32 with this forward's appended (recorded by the tracker's hook), or None without a tracker."""
        self.chain = self.rope = None
        if tracker is None:
            return positions
        new = tracker.take(batch, length, who).to(torch.int32)
        return new if positions is None else torch.cat([positions, new], dim=1)

    def cos_sin(self, tracker: RotaryTracker, positions: torch.Tensor, start: int, stop: int, layer_idx: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, stop - start, R] of cached tokens for layer `layer_idx`. Every layer of a forward asks for the
        same range, and layers of one kind (`RotaryTracker.kind`) share cos/sin: computed once per kind."""
        if self.rope is None or self.rope[0] != (start, stop):
            self.rope = ((start, stop), {})
        kind, per_kind = tracker.kind(layer_idx), self.rope[1]
        if kind not in per_kind:
            per_kind[kind] = tracker.cos_sin(positions[:, start:stop], layer_idx)
        return per_kind[kind]

    def chain_for(self, layer_idx: int, source: int | None, num_tokens: int, who: str) -> KV | None:
        """The chain layer `layer_idx` is predicted from: layer `source`'s reconstruction of num_tokens tokens, kept by
        this forward (None for a chain start)."""
        if source is None:
            return None
        if self.chain is None or self.chain[0] != source or self.chain[1][0].shape[2] != num_tokens:
            got = "nothing" if self.chain is None else \
                f"layer {self.chain[0]} with {self.chain[1][0].shape[2]} tokens"
            raise RuntimeError(f"{who}: layer {layer_idx} needs layer {source}'s reconstruction of {num_tokens} "
                               f"tokens from this forward, found {got}")
        return self.chain[1]


def decode_blocks(codec: KVCodec, layer_idx: int, store, n_tokens: int, step: int, chain: KV | None,
                  cos: torch.Tensor | None, sin: torch.Tensor | None, dtype: torch.dtype, chain_out: KV | None,
                  out: KV | None = None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The one decode route: tokens [0, n_tokens) of a store, `step` at a time, as (start, stop, keys, values)
    [B, H, stop - start, D] in `dtype` (keys re-rotated when cos/sin are given). out: [B, H, n_tokens, D] tensors the
    blocks are written into (materialized), or None (fresh tensors per block: blockwise). chain_out: [B, H,
    n_tokens, D] views receiving this layer's reconstruction, or None."""
    for t0 in range(0, n_tokens, step):
        t1 = min(n_tokens, t0 + step)
        c, s = (None, None) if cos is None else (cos[:, t0:t1], sin[:, t0:t1])
        with torch.no_grad():  # not around the yield: the consumer (attention) keeps its own grad mode
            keys, values = codec.decode(layer_idx, store, tokens(chain, t0, t1), start=t0, stop=t1, cos=c, sin=s,
                                        dtype=dtype, chain_out=tokens(chain_out, t0, t1), out=tokens(out, t0, t1))
        yield t0, t1, keys, values


def encode_buffer(codec: KVCodec, layer_idx: int, store, chain: KV | None, cos, sin, n_old: int,
                  buf_k: torch.Tensor, buf_v: torch.Tensor) -> tuple[object, torch.Tensor, torch.Tensor]:
    """The buffer (post-RoPE, storage dtype) encoded as the chunk after the n_old stored tokens -> (new store,
    keys_hat, values_hat)."""
    k_in = buf_k.float()
    if codec.pre_rope:
        k_in = unrotate(k_in, cos[:, n_old:], sin[:, n_old:])
    chunk, k_hat, v_hat = codec.encode(layer_idx, k_in, buf_v.float(), tokens(chain, n_old, None))
    return codec.append(store, chunk), k_hat, v_hat


@torch.no_grad()
def serve_layer(codec: KVCodec, layer_idx: int, store, *, chain: KV | None, cos, sin, n_old: int, n_new: int,
                buf_k: torch.Tensor | None, buf_v: torch.Tensor | None, keep_chain: bool, chain_dtype: torch.dtype,
                keys: torch.Tensor, values: torch.Tensor, start: int, step: int | None
                ) -> tuple[object, KV | None, DeferredLayer | None]:
    """A layer's quantized tokens in one update: encode the buffer as a new chunk if n_new, and decode the n_old
    stored tokens, now into keys / values [:, :, start:start + n_old] (step None: materialized) or later, `step`
    tokens at a time, by the blockwise attention that consumes the returned DeferredLayer (keys / values are then
    the exact tokens only, sinks | buffer). Changes nothing of the layer; runs without autograd (codes carry no
    gradient).

    Returns (the store with the new chunk, this layer's reconstruction of all n_old + n_new quantized tokens in
    chain_dtype when keep_chain (a later layer is predicted from it; for blockwise the old tokens' part is filled as
    attention reads them) else None, the DeferredLayer or None).
    """
    chain_out = new_chain(keys, n_old + n_new, chain_dtype) if keep_chain else None
    new_store = store
    if n_new:
        new_store, k_hat, v_hat = encode_buffer(codec, layer_idx, store, chain, cos, sin, n_old, buf_k, buf_v)
        if chain_out is not None:
            chain_out[0][:, :, n_old:].copy_(k_hat)
            chain_out[1][:, :, n_old:].copy_(v_hat)
    if not n_old:
        return new_store, chain_out, None
    c, s = (None, None) if cos is None else (cos[:, :n_old], sin[:, :n_old])
    if step is None:
        out = (keys[:, :, start:start + n_old], values[:, :, start:start + n_old])
        for _ in decode_blocks(codec, layer_idx, store, n_old, n_old, chain, c, s, keys.dtype, chain_out, out):
            pass
        return new_store, chain_out, None

    def blocks():
        return decode_blocks(codec, layer_idx, store, n_old, step, chain, c, s, keys.dtype, chain_out)

    return new_store, chain_out, DeferredLayer(layer_idx, keys, values, start, n_old, blocks)


@torch.no_grad()
def materialize_layers(layers: list, codec: KVCodec, sources: list[int | None], tracker: RotaryTracker | None,
                       positions: torch.Tensor | None, chain_dtype: torch.dtype, dtype: torch.dtype) -> list[KV]:
    """`ChunkedKVCache.materialize`: every layer whole, in `dtype`, the stored tokens through `decode_blocks`."""
    out, chain, state = [], None, ForwardState()
    for layer_idx, layer in enumerate(layers):
        if isinstance(layer, LocalLayer):  # what the next forward reads of it: the window
            out.append((layer.keys.to(dtype), layer.values.to(dtype)) if layer.num_buffered else
                       (torch.empty(0), torch.empty(0)))
            continue
        s, n, b = layer.num_sinks, layer.num_quantized, layer.num_buffered
        if not s + n + b:
            out.append((torch.empty(0), torch.empty(0)))
            continue
        keys = torch.empty((layer.batch, layer.num_heads, s + n + b, layer.head_dim), dtype=dtype, device=layer.device)
        values = torch.empty_like(keys)
        if s:
            keys[:, :, :s], values[:, :, :s] = layer.sink_k, layer.sink_v
        if b:
            keys[:, :, s + n:], values[:, :, s + n:] = layer.buf_k, layer.buf_v
        if n:
            prev = on_device(chain, layer.device) if sources[layer_idx] is not None else None
            cos = sin = None
            if codec.pre_rope:
                cos, sin = on_device(state.cos_sin(tracker, positions, s, s + n, layer_idx), layer.device)
            chain = new_chain(keys, n, chain_dtype) if codec.needs_previous_layer else None
            dest = (keys[:, :, s:s + n], values[:, :, s:s + n])
            for _ in decode_blocks(codec, layer_idx, layer.store, n, n, prev, cos, sin, dtype, chain, dest):
                pass
        out.append((keys, values))
    return out
