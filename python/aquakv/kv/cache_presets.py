"""The compressed caches by codec: `aquakv.kv.cache.ChunkedKVCache` with the AQUA-KV codec (AquaKVCache), the same
codec with a zero prediction (HiggsCache) or the KIVI codec (KiviCache). Each only builds its codec.
"""
from __future__ import annotations

from typing import Callable

import torch

from aquakv.kv.aqua_codec import AquaKVCodec
from aquakv.kv.cache import ChunkedKVCache
from aquakv.kv.kivi import KiviCodec
from aquakv.kv.predictors import AquaKVPredictors


class AquaKVCache(ChunkedKVCache):
    """The AQUA-KV cache: `model(..., cache=AquaKVCache(model, predictors))` or `generate(...)`
    (`past_key_values=` before transformers 5.24).

    quantize=False runs the same pipeline (un-rotation, predictors, chunks) without quantization, storing exact
    states in the model's dtype: it reproduces DynamicCache up to float rounding.
    attention="blockwise" rebuilds the quantized tokens block by block inside attention (see ChunkedKVCache).
    predictor_dtype=torch.bfloat16 runs the predictor matmuls in bfloat16 (see AquaKVCodec).
    """

    def __init__(self, model, predictors: AquaKVPredictors, *, sinks: int = 4, buffer: int = 128,
                 quantize: bool = True, storage_dtype: torch.dtype | None = None,
                 rotary: torch.nn.Module | None = None, attention: str = "materialize",
                 block_tokens: int | None = None, chain_dtype: torch.dtype | None = None,
                 predictor_dtype: torch.dtype = torch.float32):
        predictors.check_compatible(model)
        model_dtype = next(model.parameters()).dtype
        if not quantize and storage_dtype is None:
            storage_dtype = model_dtype
        codec = AquaKVCodec(predictors, quantize=quantize, exact_dtype=model_dtype, predictor_dtype=predictor_dtype)
        super().__init__(model, codec, sinks=sinks, buffer=buffer, storage_dtype=storage_dtype, rotary=rotary,
                         attention=attention, block_tokens=block_tokens, chain_dtype=chain_dtype)
        self.predictors = predictors


class HiggsCache(ChunkedKVCache):
    """HIGGS without adapters: every layer's states quantized directly (the AQUA-KV ablation): the AQUA-KV codec
    given zero predictors, which predicts nothing and so keeps no layer's reconstruction.

    layer0_bits: None quantizes layer 0 at `bits` like the others; a number or "fp16" treats it apart.
    quantize=False stores exact states in the model's dtype. Other keyword arguments (sinks, buffer,
    storage_dtype, rotary, attention, ...) go to `ChunkedKVCache`.
    """

    def __init__(self, model, bits: float = 2, *, grid_dim: int = 2, group_size: int | None = None,
                 layer0_bits: float | str | None = None, seed: int = 0, quantize: bool = True, **kwargs):
        zeros = AquaKVPredictors.zeros(model, bits, grid_dim=grid_dim, group_size=group_size,
                                       layer0_bits=layer0_bits, seed=seed)
        model_dtype = next(model.parameters()).dtype
        if not quantize and kwargs.get("storage_dtype") is None:
            kwargs["storage_dtype"] = model_dtype
        super().__init__(model, AquaKVCodec(zeros, quantize=quantize, exact_dtype=model_dtype), **kwargs)
        self.settings = zeros.settings


class KiviCache(ChunkedKVCache):
    """KIVI-style 1/2/4/8-bit KV cache: `model(..., cache=KiviCache(model, bits=2))` or `generate()`.

    The newest tokens wait in an fp16 buffer (KIVI's residual window, `buffer` = its residual length R) and are
    quantized as one chunk once `buffer` of them have accumulated; `sinks` first tokens stay in fp16 (KIVI itself
    keeps none; 4 gives it the same policy as AQUA-KV so that a comparison isolates the quantizer).
    `nbytes()` counts every byte; `bits_per_value()` covers the quantized part (codes, scales, zero points).
    """

    def __init__(self, model, bits: int = 2, *, group_size: int = 32, sinks: int = 4, buffer: int = 128,
                 pre_rope: bool = False, storage_dtype: torch.dtype | None = None, attention: str = "materialize",
                 block_tokens: int | None = None):
        super().__init__(model, KiviCodec(bits, group_size, pre_rope), sinks=sinks, buffer=buffer,
                         storage_dtype=storage_dtype, attention=attention, block_tokens=block_tokens)


def kivi_factory(bits: int = 2, **kwargs) -> Callable[[torch.nn.Module], KiviCache]:
    """A cache_factory for `aquakv.evaluation.evaluate_perplexity`: model -> fresh KiviCache(model, bits, **kwargs)."""
    return lambda model: KiviCache(model, bits, **kwargs)
