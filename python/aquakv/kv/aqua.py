"""AQUA-KV: each layer's chunk is predicted from the previous layer's reconstruction of the same tokens and only the
residual is HIGGS-quantized (docs/kv_cache.md).

    K^_l = P^K_l + Q(K_l - P^K_l),  V^_l = P^V_l + Q(V_l - P^V_l)   (predictors: aquakv.kv.predictors)
"""
from __future__ import annotations

import torch

from aquakv.kv.codec import KV
from aquakv.kv.higgs import HiggsRowsCodec, HiggsStore, _heads, _rows
from aquakv.kv.policy import ChunkedKVCache
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.quantizer import HiggsQuantizer

AquaStore = HiggsStore  # the residuals' storage is HIGGS's row storage


class AquaKVCodec(HiggsRowsCodec):
    """AQUA-KV: K^_l = P^K_l + Q(K_l - P^K_l) with P from `AquaKVPredictors` (zero predictors = plain HIGGS, which
    `aquakv.kv.higgs.HiggsCodec` does without keeping the previous layer's reconstruction).

    The residuals live in HIGGS's row storage (`HiggsRowsCodec`: append, batch selection, truncation, bytes).
    quantize=False stores the residuals unquantized in `exact_dtype` (the whole pipeline without its loss: for
    testing and for measuring what quantization alone costs).
    """

    needs_previous_layer = True

    def __init__(self, predictors: AquaKVPredictors, *, quantize: bool = True,
                 exact_dtype: torch.dtype = torch.float32):
        super().__init__(quantize=quantize, exact_dtype=exact_dtype)
        self.predictors = predictors

    def _quantizer(self, layer_idx: int) -> HiggsQuantizer | None:
        return self.predictors.quantizer(layer_idx)

    def _prev_rows(self, layer_idx: int, prev: KV | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if layer_idx == 0:
            return None, None
        if prev is None:
            raise RuntimeError(f"AquaKVCodec: layer {layer_idx} needs layer {layer_idx - 1}'s reconstruction")
        return _rows(prev[0]), _rows(prev[1])

    @staticmethod
    def _add(pred: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return x if pred is None else pred + x

    def encode(self, layer_idx, keys, values, prev):
        preds = self.predictors
        prev_k, prev_v = self._prev_rows(layer_idx, prev)
        k, v = _rows(keys.float()), _rows(values.float())
        pk = preds.predict_keys(layer_idx, prev_k, like=k)
        k_part, k_res = self._encode_part(layer_idx, k if pk is None else k - pk)
        k_hat = self._add(pk, k_res)
        pv = preds.predict_values(layer_idx, k_hat, prev_v)
        v_part, v_res = self._encode_part(layer_idx, v if pv is None else v - pv)
        v_hat = self._add(pv, v_res)
        h = keys.shape[1]
        return HiggsStore(k_part, v_part), _heads(k_hat, h), _heads(v_hat, h)

    def decode(self, layer_idx, store, prev):
        preds = self.predictors
        prev_k, prev_v = self._prev_rows(layer_idx, prev)
        k_res = self._decode_part(layer_idx, store.keys)
        k_hat = self._add(preds.predict_keys(layer_idx, prev_k, like=k_res), k_res)
        v_res = self._decode_part(layer_idx, store.values)
        v_hat = self._add(preds.predict_values(layer_idx, k_hat, prev_v), v_res)
        h = self.predictors.num_kv_heads
        return _heads(k_hat, h), _heads(v_hat, h)


class AquaKVCache(ChunkedKVCache):
    """The AQUA-KV cache: `model(..., cache=AquaKVCache(model, predictors))` or `generate(...)`
    (`past_key_values=` before transformers 5.24).

    quantize=False runs the same pipeline (un-rotation, predictors, chunks) without quantization, storing exact
    states in the model's dtype: it reproduces DynamicCache up to float rounding.
    attention="blockwise" rebuilds the quantized tokens block by block inside attention (see ChunkedKVCache).
    """

    def __init__(self, model, predictors: AquaKVPredictors, *, sinks: int = 4, buffer: int = 128,
                 quantize: bool = True, storage_dtype: torch.dtype | None = None,
                 rotary: torch.nn.Module | None = None, attention: str = "materialize", block_tokens: int = 1024):
        predictors.check_compatible(model)
        model_dtype = next(model.parameters()).dtype
        if not quantize and storage_dtype is None:
            storage_dtype = model_dtype
        codec = AquaKVCodec(predictors, quantize=quantize, exact_dtype=model_dtype)
        super().__init__(model, codec, sinks=sinks, buffer=buffer, storage_dtype=storage_dtype, rotary=rotary,
                         attention=attention, block_tokens=block_tokens)
        self.predictors = predictors
