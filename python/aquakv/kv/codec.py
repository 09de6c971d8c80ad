"""The codec protocol of the chunked KV caches: how one layer's chunks of keys and values are compressed.

The chunking policy (`aquakv.kv.policy.ChunkedKVCache`) decides which tokens are compressed and when; a codec
decides how. A "store" is whatever object the codec keeps for the compressed tokens of one layer; the policy only
hands it back to the codec.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class KVCodec(ABC):
    """Compresses chunks of one layer's keys and values. All tensors [B, H, T, D] float32 on the model's device.

    A "store" is whatever object the codec uses for the quantized tokens of one layer; the policy only passes
    it back to the codec.
    """

    pre_rope: bool = True  # keys arrive un-rotated and decoded keys get re-rotated by the policy
    needs_previous_layer: bool = False  # encode/decode get prev = layer l-1's reconstruction of the same tokens

    @abstractmethod
    def encode(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, prev: KV | None
               ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One new chunk -> (store of these tokens, keys_hat, values_hat)."""

    @abstractmethod
    def decode(self, layer_idx: int, store: Any, prev: KV | None) -> KV:
        """Every token of the store -> (keys_hat, values_hat)."""

    @abstractmethod
    def append(self, store: Any | None, new: Any) -> Any:
        """The store after the tokens of `new` (encoded later) were added at its end."""

    @abstractmethod
    def select_batch(self, store: Any, index: torch.Tensor) -> Any:
        """Rows `index` (LongTensor [B'], may repeat) of the batch dimension."""

    @abstractmethod
    def truncate(self, store: Any, n_tokens: int) -> Any:
        """Keep the first n_tokens (1 <= n_tokens <= num_tokens)."""

    @abstractmethod
    def num_tokens(self, store: Any) -> int: ...

    @abstractmethod
    def nbytes(self, store: Any) -> int:
        """Every byte the store holds."""
