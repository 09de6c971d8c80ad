"""HIGGS on the KV states without predictors: the ablation of AQUA-KV."""
from __future__ import annotations

from aquakv.kv.aqua import AquaKVCache
from aquakv.kv.predictors import AquaKVPredictors


class HiggsCache(AquaKVCache):
    """HIGGS without adapters: every layer's states quantized directly (AQUA-KV with zero predictors).

    layer0_bits: None quantizes layer 0 at `bits` like the others; a number or "fp16" treats it apart.
    """

    def __init__(self, model, bits: float = 2, *, grid_dim: int = 2, group_size: int | None = None,
                 layer0_bits: float | str | None = None, seed: int = 0, **kwargs):
        super().__init__(model, AquaKVPredictors.zeros(model, bits, grid_dim=grid_dim, group_size=group_size,
                                                       layer0_bits=layer0_bits, seed=seed), **kwargs)
