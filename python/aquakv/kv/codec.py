"""The codec protocol: how one layer's keys and values are compressed, on plain tensors. Every KV codec of the
package (AQUA-KV and HIGGS in `aquakv.kv.aqua_codec`, KIVI in `aquakv.kv.kivi`) implements `KVCodec`; the
transformers cache (`aquakv.kv.cache.ChunkedKVCache`) is one caller of it, and anything that holds tensors (a
paged-attention backend) can be another. Nothing here, nor in any codec, imports transformers.

Words (docs/kv_cache.md draws them):
  store    what a codec keeps for the compressed tokens of one layer (packed codes, scales...): an object only the
           codec reads; the caller keeps it and hands it back. Stores hold compact tensors (`compact`).
  chain    the previous compressed layer's reconstruction of the same tokens ([B, H, T, D], keys before RoPE), which
           AQUA-KV predicts a layer from. `encode` and `decode` take the chain in and give this layer's
           reconstruction out, which is the next layer's chain. The caller owns it and keeps it only while it walks
           the layers of one forward (`aquakv.kv.cache_state.ForwardState`).
  pre_rope a codec that stores keys before RoPE: its caller un-rotates keys before `encode` and passes the cos/sin
           of the decoded tokens to `decode`, which re-rotates them.

Three kinds of layer, each explicit:
  chain start  layer 0, or the first compressed layer of a hybrid model: chain=None in and out of nothing (AQUA-KV
               codes it with an intercept-only prediction and layer 0's quantizer).
  chained      every other compressed layer: chain = the reconstruction of `aquakv.kv.local_layers.chain_sources`.
  exact local  a hybrid model's sliding-window layer: never reaches a codec (the cache keeps it exact).
Codecs that do not predict (HIGGS, KIVI) have needs_previous_layer = False and are always given chain=None.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from aquakv.kv.rope import rotate

KV = tuple[torch.Tensor, torch.Tensor]


class KVCodec(ABC):
    """Compresses runs of one layer's keys and values. Tensors are [B, H, T, D]; reconstructions are float32.

    Every method returns a new store and leaves the one it was given as it was: a caller can build a layer's next
    state aside and keep it only once everything has succeeded.
    """

    pre_rope: bool = True  # keys are encoded un-rotated; decode re-rotates them with the cos/sin it is given
    needs_previous_layer: bool = False  # encode/decode read the chain (AQUA-KV with predictors)

    @abstractmethod
    def encode(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, chain: KV | None
               ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """A run of new tokens (keys un-rotated when pre_rope) and the chain's reconstruction of the same tokens ->
        (a store of these tokens, keys_hat, values_hat): this layer's reconstruction, the next layer's chain."""

    @abstractmethod
    def decode(self, layer_idx: int, store: Any, chain: KV | None, *, start: int = 0, stop: int | None = None,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32, chain_out: KV | None = None, out: KV | None = None) -> KV:
        """Tokens [start, stop) of the store (stop None: all) -> (keys, values) [B, H, stop - start, D] in `dtype`.

        chain: the chain's reconstruction of those tokens (None for a chain start or a codec that does not
        predict). cos/sin [B, stop - start, R]: re-rotate the keys (pre_rope codecs; None leaves them un-rotated).
        chain_out: [B, H, stop - start, D] tensors (views of a larger buffer are fine, any float dtype) that receive
        this layer's un-rotated reconstruction, the next layer's chain; or None. out: [B, H, stop - start, D]
        tensors of `dtype` to write and return (e.g. views of the keys attention reads), or None. Reads only what
        those tokens need.
        """

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


def deliver(k_hat: torch.Tensor, v_hat: torch.Tensor, *, cos: torch.Tensor | None, sin: torch.Tensor | None,
            dtype: torch.dtype, chain_out: KV | None, out: KV | None) -> KV:
    """The end of a composed `KVCodec.decode` (codecs without a fused kernel for it): the reconstruction
    (k_hat, v_hat) [B, H, T, D] float32 written into chain_out, keys re-rotated with cos/sin (if given), both
    written into `out` or returned in `dtype`."""
    if chain_out is not None:
        chain_out[0].copy_(k_hat)
        chain_out[1].copy_(v_hat)
    if cos is not None:
        k_out = torch.empty(k_hat.shape, dtype=dtype, device=k_hat.device) if out is None else out[0]
        k_hat = rotate(k_hat, cos, sin, out=k_out)
    if out is None:
        return k_hat.to(dtype), v_hat.to(dtype)
    if k_hat is not out[0]:
        out[0].copy_(k_hat)
    out[1].copy_(v_hat)
    return out


def compact(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is the whole of its own storage, else a compact copy.

    Caches and codecs keep only compact tensors: a kept view (a slice of a bigger update, a cropped prefix)
    would hold the bytes of the tensor it was cut from, and `nbytes()`, which counts numel * element_size,
    would under-report them.
    """
    whole = x.is_contiguous() and x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.nbytes
    return x if whole else x.clone(memory_format=torch.contiguous_format)
