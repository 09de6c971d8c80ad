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
    testing and for measuring what quantization alone costs). predictor_dtype: the predictor matmuls' dtype,
    float32 or bfloat16 (inputs and matrices rounded to bfloat16, accumulated in float32: 2-4x faster on CPUs
    with AVX512-BF16 or AMX and on GPUs, docs/kv_cache.md has its cost in perplexity).
    """

    needs_previous_layer = True

    def __init__(self, predictors: AquaKVPredictors, *, quantize: bool = True,
                 exact_dtype: torch.dtype = torch.float32, predictor_dtype: torch.dtype = torch.float32):
        if predictor_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AquaKVCodec: predictor_dtype must be torch.float32 or torch.bfloat16, got "
                             f"{predictor_dtype}")
        super().__init__(quantize=quantize, exact_dtype=exact_dtype)
        self.predictors = predictors
        self.predictor_dtype = predictor_dtype
        self._op_maps: dict = {}  # (layer, key|value, device) -> the map in aqua_reconstruct's layout

    @property
    def num_kv_heads(self) -> int:
        return self.predictors.num_kv_heads

    def _quantizer(self, layer_idx: int) -> HiggsQuantizer | None:
        return self.predictors.quantizer(layer_idx)

    def _prev_rows(self, layer_idx: int, prev: KV | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        source = self.predictors.sources[layer_idx]
        if source is None:
            return None, None
        if prev is None:
            raise RuntimeError(f"AquaKVCodec: layer {layer_idx} needs layer {source}'s reconstruction")
        return _rows(prev[0]), _rows(prev[1])  # in the chain's dtype: the maps cast it to the matmuls'

    @staticmethod
    def _add(pred: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return x if pred is None else pred + x

    def encode(self, layer_idx, keys, values, prev):
        preds = self.predictors
        prev_k, prev_v = self._prev_rows(layer_idx, prev)
        k, v = _rows(keys.float()), _rows(values.float())
        pk = preds.predict_keys(layer_idx, prev_k, like=k, matmul_dtype=self.predictor_dtype)
        k_part, k_res = self._encode_part(layer_idx, k if pk is None else k - pk)
        k_hat = self._add(pk, k_res)
        pv = preds.predict_values(layer_idx, k_hat, prev_v, matmul_dtype=self.predictor_dtype)
        v_part, v_res = self._encode_part(layer_idx, v if pv is None else v - pv)
        v_hat = self._add(pv, v_res)
        h = keys.shape[1]
        return HiggsStore(k_part, v_part), _heads(k_hat, h), _heads(v_hat, h)

    def decode(self, layer_idx, store, prev):
        preds = self.predictors
        prev_k, prev_v = self._prev_rows(layer_idx, prev)
        k_res = self._decode_part(layer_idx, store.keys)
        k_hat = self._add(preds.predict_keys(layer_idx, prev_k, like=k_res, matmul_dtype=self.predictor_dtype), k_res)
        v_res = self._decode_part(layer_idx, store.values)
        v_hat = self._add(preds.predict_values(layer_idx, k_hat, prev_v, matmul_dtype=self.predictor_dtype), v_res)
        h = self.predictors.num_kv_heads
        return _heads(k_hat, h), _heads(v_hat, h)

    def _op_map(self, layer_idx: int, kind: str, device: torch.device, width: int):
        """(weights, up, bias) of a layer's key or value map in the op's layout, on `device`, matrices in the
        predictor dtype (kept per device)."""
        key = (layer_idx, kind, device)
        cached = self._op_maps.get(key)
        if cached is None:
            m = (self.predictors.key_maps if kind == "key" else self.predictors.value_maps)[layer_idx]
            if m is None:  # a zero prediction
                cached = ([], None, torch.zeros(width, dtype=torch.float32, device=device))
            else:
                weights, up, bias = m._params(device, self.predictor_dtype).op_weights()
                cached = ([w.contiguous() for w in weights], None if up is None else up.contiguous(), bias.contiguous())
            self._op_maps[key] = cached
        return cached


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
