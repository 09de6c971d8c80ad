"""One layer of the chunked KV caches: the codec protocol (how its chunks of keys and values are compressed) and
the layer's state (`ChunkedLayer`: sinks | codec store | buffer, and its row and length edits).

The chunking policy (`aquakv.kv.policy.ChunkedKVCache`) decides which tokens are compressed and when; a codec
decides how. A "store" is whatever object the codec keeps for the compressed tokens of one layer; the policy only
hands it back to the codec. Stores hold compact tensors only (see `compact`), so that byte counts are real.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from aquakv.kv.rope import rotate

KV = tuple[torch.Tensor, torch.Tensor]


class KVCodec(ABC):
    """Compresses chunks of one layer's keys and values. All tensors [B, H, T, D] float32 on the model's device.

    A "store" is whatever object the codec uses for the quantized tokens of one layer; the policy only passes
    it back to the codec. Every method returns a new store and leaves the one it was given as it was: the cache
    builds a layer's next state aside and keeps it only once the whole update has succeeded. Stores hold compact
    tensors (`compact`), so that `nbytes` is what they really keep alive.
    """

    pre_rope: bool = True  # keys arrive un-rotated and decoded keys get re-rotated by the policy
    # encode/decode get prev = the previous compressed layer's reconstruction of the same tokens (layer l-1 unless
    # the model has exact local layers: aquakv.kv.window.chain_sources)
    needs_previous_layer: bool = False

    @abstractmethod
    def encode(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, prev: KV | None
               ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One new chunk -> (store of these tokens, keys_hat, values_hat)."""

    @abstractmethod
    def decode(self, layer_idx: int, store: Any, prev: KV | None) -> KV:
        """Every token of the store -> (keys_hat, values_hat)."""

    decodes_ranges: bool = False  # decode_range is implemented (attention="blockwise" needs it)
    # decode_block is one fused kernel: the policy then decodes a materialized layer through it too, straight into
    # the buffer attention reads, instead of decode + rotate + copy
    fused_decode_block: bool = False

    def decode_range(self, layer_idx: int, store: Any, start: int, stop: int, prev: KV | None) -> KV:
        """Tokens [start, stop) of the store -> (keys_hat, values_hat) [B, H, stop - start, D], touching only what
        those tokens need; prev: layer l-1's reconstruction of the same tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not decode token ranges")

    def decode_block(self, layer_idx: int, store: Any, start: int, stop: int, prev: KV | None,
                     cos: torch.Tensor | None, sin: torch.Tensor | None, dtype: torch.dtype, hat: KV | None,
                     out: KV | None = None) -> KV:
        """Tokens [start, stop) as attention reads them: (keys, values) [B, H, stop - start, D] in `dtype`, keys
        re-rotated with cos/sin [B, stop - start, D] when the codec is pre-RoPE. hat: [B, H, T_b, D] views (any float
        dtype) that receive the un-rotated reconstruction (what the next layer's predictor reads), or None.
        out: [B, H, T_b, D] tensors of `dtype` (views of a larger buffer are fine) to write and return, or None.
        Codecs with a fused kernel override this; the default composes decode_range and rotate."""
        k_hat, v_hat = self.decode_range(layer_idx, store, start, stop, prev)
        if hat is not None:
            hat[0].copy_(k_hat)
            hat[1].copy_(v_hat)
        if self.pre_rope:
            k_out = torch.empty(k_hat.shape, dtype=dtype, device=k_hat.device) if out is None else out[0]
            k_hat = rotate(k_hat, cos, sin, out=k_out)
        if out is None:
            return k_hat.to(dtype), v_hat.to(dtype)
        if k_hat is not out[0]:
            out[0].copy_(k_hat)
        out[1].copy_(v_hat)
        return out

    @abstractmethod
    def append(self, store: Any | None, new: Any) -> Any:
        """The store after the tokens of `new` (encoded later) were added at its end (store: None when empty)."""

    @abstractmethod
    def select_batch(self, store: Any, index: torch.Tensor) -> Any:
        """Rows `index` (LongTensor [B'], may repeat) of the batch dimension."""

    @abstractmethod
    def truncate(self, store: Any, n_tokens: int) -> Any:
        """Keep the first n_tokens (1 <= n_tokens <= num_tokens); the result keeps no view of the cut tokens."""

    @abstractmethod
    def num_tokens(self, store: Any) -> int: ...

    @abstractmethod
    def nbytes(self, store: Any) -> int:
        """Every byte the store holds."""


def compact(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is the whole of its own storage, else a compact copy.

    Caches and codecs keep only compact tensors: a kept view (a slice of a bigger update, a cropped prefix)
    would hold the bytes of the tensor it was cut from, and `nbytes()`, which counts numel * element_size,
    would under-report them.
    """
    whole = x.is_contiguous() and x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.nbytes
    return x if whole else x.clone(memory_format=torch.contiguous_format)


class ChunkedLayer(CacheLayerMixin):
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
        self.sink_k, self.sink_v = _keep(self.sink_k, n_sink), _keep(self.sink_v, n_sink)
        self.buf_k, self.buf_v = _keep(self.buf_k, n_buf), _keep(self.buf_v, n_buf)
        if n_quant < self.num_quantized:
            self.store = codec.truncate(self.store, n_quant) if n_quant else None
        self.num_sinks, self.num_quantized, self.num_buffered = n_sink, n_quant, n_buf


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """a | b along the tokens, in a tensor of its own (b may be a slice of the model's update)."""
    return compact(b) if a is None else torch.cat([a, b], dim=-2)


def _keep(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
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
