"""Local (sliding-window) layers of hybrid models, kept exact in a rolling window (docs/model_families.md).

Gemma 2/3 and other hybrid models mix global layers, which attend to the whole past, with local layers that attend
only to the last `sliding_window` tokens. A local layer's cache is bounded by its window, so at long context the
memory is the global layers'; and every token a local layer drops is one the next layer can no longer be predicted
from. So the compressed caches keep local layers of hybrid models exact in a rolling window, as transformers'
DynamicCache does, and compress the global layers only, each AQUA-KV global layer predicted from the previous
global one. Models whose layers all slide (Mistral) have nothing else to compress: their layers stay compressed.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

SLIDING = "sliding_attention"


def sliding_layers(config) -> dict[int, int]:
    """{layer index: sliding window} of the layers that attend to a window only (those transformers' DynamicCache
    keeps as rolling windows): the `sliding_attention` entries of `config.layer_types`, or, for configs without
    layer types (Mistral), every layer when `sliding_window` is set."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return {}
    types = getattr(cfg, "layer_types", None) or [SLIDING] * cfg.num_hidden_layers
    return {i: int(window) for i, t in enumerate(types) if t == SLIDING}


def window_layers(config) -> dict[int, int]:
    """{layer index: sliding window} of the layers a compressed cache keeps exact: the sliding layers of a hybrid
    model (some layers global); {} for any other model."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    sliding = sliding_layers(cfg)
    return sliding if len(sliding) < cfg.num_hidden_layers else {}


def chain_sources(num_layers: int, exact: set[int] | dict) -> list[int | None]:
    """Per layer, the layer whose reconstruction AQUA-KV predicts it from: the previous compressed layer (None for
    the first compressed layer, which is coded like layer 0, and for exact layers, which are not predicted)."""
    sources, last = [], None
    for layer in range(num_layers):
        if layer in exact:
            sources.append(None)
            continue
        sources.append(last)
        last = layer
    return sources


class WindowLayer(DynamicSlidingWindowLayer):
    """An exact local layer: the last `sliding_window - 1` tokens (plus those of the forward in progress), post-RoPE,
    in the cache's storage dtype; transformers' own sliding-window layer (its mask sizes, its rolling), with the
    interface `aquakv.kv.policy.ChunkedKVCache` drives its layers through."""

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
        self.check_keep_first(keep, "WindowLayer.keep_first")
        held, drop = self.num_buffered, self.cumulative_length - keep
        self.keys = self.keys[:, :, :held - drop].clone()
        self.values = self.values[:, :, :held - drop].clone()
        self.cumulative_length = keep

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
