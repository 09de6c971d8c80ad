"""AQUA-KV (DESIGN.md section 2): each layer's chunk is predicted from the previous layer's reconstruction of the
same tokens and only the residual is HIGGS-quantized.

    K^_l = P^K_l + Q(K_l - P^K_l),  V^_l = P^V_l + Q(V_l - P^V_l)   (predictors: aquakv.kv.predictors)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aquakv.kv.codec import KV, KVCodec
from aquakv.kv.policy import ChunkedKVCache
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.quantizer import HiggsQuantizer, QuantizedTensor


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, C = H*D] (heads concatenated, as k_proj/v_proj lay them out)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, C] -> [B, H, T, D]."""
    b, t, c = x.shape
    return x.reshape(b, t, num_heads, c // num_heads).transpose(1, 2)


Part = QuantizedTensor | torch.Tensor  # one of K or V for [B, T, C] tokens: HIGGS codes, or a plain tensor


def _part_map(part: Part, fn) -> Part:
    """Apply fn to every [B, T, ...] view of a part (codes and scales of a QuantizedTensor, or the tensor)."""
    if isinstance(part, torch.Tensor):
        return fn(part)
    b, t, c = part.shape
    codes = fn(part.codes.view(b, t, -1))
    scales = fn(part.scales.view(b, t, -1))
    shape = torch.Size((codes.shape[0], codes.shape[1], c))
    return QuantizedTensor(codes.reshape(-1, codes.shape[-1]), scales.reshape(-1, scales.shape[-1]), shape,
                           part.dtype, part.settings)


def _part_cat(a: Part, b: Part) -> Part:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=1)
    ba, ta, c = a.shape
    tb = b.shape[1]
    codes = torch.cat([a.codes.view(ba, ta, -1), b.codes.view(ba, tb, -1)], dim=1)
    scales = torch.cat([a.scales.view(ba, ta, -1), b.scales.view(ba, tb, -1)], dim=1)
    return QuantizedTensor(codes.reshape(-1, codes.shape[-1]), scales.reshape(-1, scales.shape[-1]),
                           torch.Size((ba, ta + tb, c)), a.dtype, a.settings)


def _part_nbytes(part: Part) -> int:
    if isinstance(part, torch.Tensor):
        return part.numel() * part.element_size()
    return part.nbytes


@dataclass
class AquaStore:
    """Quantized tokens of one layer: keys and values [B, T, C] as HIGGS codes of the residuals (or fp16/exact
    tensors of the residuals where the layer is not quantized)."""

    keys: Part
    values: Part

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]


class AquaKVCodec(KVCodec):
    """AQUA-KV: K^_l = P^K_l + Q(K_l - P^K_l) with P from `AquaKVPredictors` (zero predictors = plain HIGGS).

    quantize=False stores the residuals unquantized in `exact_dtype` (the whole pipeline without its loss: for
    testing and for measuring what quantization alone costs).
    """

    pre_rope = True
    needs_previous_layer = True

    def __init__(self, predictors: AquaKVPredictors, *, quantize: bool = True,
                 exact_dtype: torch.dtype = torch.float32):
        self.predictors = predictors
        self.quantize = quantize
        self.exact_dtype = exact_dtype

    def _quantizer(self, layer_idx: int) -> HiggsQuantizer | None:
        return self.predictors.quantizer(layer_idx) if self.quantize else None

    def _encode_part(self, layer_idx: int, x: torch.Tensor) -> tuple[Part, torch.Tensor]:
        """x: residual [B, T, C] float32 -> (stored part, its reconstruction float32)."""
        q = self._quantizer(layer_idx)
        if q is None:
            stored = x.to(torch.float16 if self.quantize else self.exact_dtype)
            return stored, stored.float()
        qt = q.quantize(x)
        return qt, q.dequantize(qt)

    def _decode_part(self, layer_idx: int, part: Part) -> torch.Tensor:
        if isinstance(part, torch.Tensor):
            return part.float()
        return self.predictors.quantizer(layer_idx).dequantize(part)

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
        return AquaStore(k_part, v_part), _heads(k_hat, h), _heads(v_hat, h)

    def decode(self, layer_idx, store, prev):
        preds = self.predictors
        prev_k, prev_v = self._prev_rows(layer_idx, prev)
        k_res = self._decode_part(layer_idx, store.keys)
        k_hat = self._add(preds.predict_keys(layer_idx, prev_k, like=k_res), k_res)
        v_res = self._decode_part(layer_idx, store.values)
        v_hat = self._add(preds.predict_values(layer_idx, k_hat, prev_v), v_res)
        h = self.predictors.num_kv_heads
        return _heads(k_hat, h), _heads(v_hat, h)

    def append(self, store, new):
        if store is None:
            return new
        return AquaStore(_part_cat(store.keys, new.keys), _part_cat(store.values, new.values))

    def select_batch(self, store, index):
        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, index.to(x.device))
        return AquaStore(_part_map(store.keys, pick), _part_map(store.values, pick))

    def truncate(self, store, n_tokens):
        def cut(x: torch.Tensor) -> torch.Tensor:
            return x[:, :n_tokens].contiguous()
        return AquaStore(_part_map(store.keys, cut), _part_map(store.values, cut))

    def num_tokens(self, store):
        return store.num_tokens

    def nbytes(self, store):
        return _part_nbytes(store.keys) + _part_nbytes(store.values)


class AquaKVCache(ChunkedKVCache):
    """The AQUA-KV cache: `model(..., cache=AquaKVCache(model, predictors))` or `generate(...)`
    (`past_key_values=` before transformers 5.24).

    quantize=False runs the same pipeline (un-rotation, predictors, chunks) without quantization, storing exact
    states in the model's dtype: it reproduces DynamicCache up to float rounding.
    """

    def __init__(self, model, predictors: AquaKVPredictors, *, sinks: int = 4, buffer: int = 128,
                 quantize: bool = True, storage_dtype: torch.dtype | None = None,
                 rotary: torch.nn.Module | None = None):
        predictors.check_compatible(model)
        model_dtype = next(model.parameters()).dtype
        if not quantize and storage_dtype is None:
            storage_dtype = model_dtype
        codec = AquaKVCodec(predictors, quantize=quantize, exact_dtype=model_dtype)
        super().__init__(model, codec, sinks=sinks, buffer=buffer, storage_dtype=storage_dtype, rotary=rotary)
        self.predictors = predictors
