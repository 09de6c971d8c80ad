"""Hybrid models' local (sliding-window) layers: which of them a compressed cache keeps exact, and the chain of
layers AQUA-KV predicts along (docs/model_families.md). Reads configs only: no torch, no transformers.

Gemma 2/3 and other hybrid models mix global layers, which attend to the whole past, with local layers that attend
only to the last `sliding_window` tokens. A local layer's cache is bounded by its window, so at long context the
memory is the global layers'; and every token a local layer drops is one the next layer can no longer be predicted
from. So the compressed caches keep local layers of hybrid models exact in a rolling window, as transformers'
DynamicCache does (`aquakv.kv.cache_state.LocalLayer`), and compress the global layers only, each AQUA-KV global
layer predicted from the previous global one. Models whose layers all slide (Mistral) have nothing else to
compress: their layers stay compressed.
"""
from __future__ import annotations

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


def exact_local_layers(config) -> dict[int, int]:
    """{layer index: sliding window} of the layers a compressed cache keeps exact: the sliding layers of a hybrid
    model (some layers global); {} for any other model."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    sliding = sliding_layers(cfg)
    return sliding if len(sliding) < cfg.num_hidden_layers else {}


def chain_sources(num_layers: int, exact: set[int] | dict) -> list[int | None]:
    """Per layer, the layer whose reconstruction AQUA-KV predicts it from (its chain source): the previous
    compressed layer; None for the first compressed layer (a chain start, coded like layer 0) and for exact layers
    (not compressed, not predicted)."""
    sources, last = [], None
    for layer in range(num_layers):
        if layer in exact:
            sources.append(None)
            continue
        sources.append(last)
        last = layer
    return sources
