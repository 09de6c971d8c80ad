"""HIGGS on the KV states without predictors (the ablation of AQUA-KV), and the row storage it shares with AQUA-KV.

A layer's quantized tokens are kept as rows [B, T, C = H*D] (heads concatenated, keys before RoPE), one "part"
for the keys and one for the values: HIGGS codes (`QuantizedTensor`) or, on a layer without a quantizer, a
plain tensor. `HiggsRowsCodec` owns that storage (encode/decode of one part, append, batch selection,
truncation, bytes); `HiggsCodec` quantizes the states themselves, `aquakv.kv.aqua.AquaKVCodec` the residuals
of its predictions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from aquakv import ops
from aquakv.kv.codec import KV, KVCodec, compact
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


def _part_map(part: Part, fn: Callable[[torch.Tensor], torch.Tensor]) -> Part:
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
class HiggsStore:
    """Quantized tokens of one layer: keys and values [B, T, C] as HIGGS codes (of the states, or of AQUA-KV's
    residuals), or as plain tensors where the layer has no quantizer."""

    keys: Part
    values: Part

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]


class HiggsRowsCodec(KVCodec):
    """The storage shared by the HIGGS and AQUA-KV codecs: one `HiggsStore` of rows per layer.

    Subclasses say which quantizer a layer uses (`_quantizer`) and what is stored (encode/decode).
    quantize=False stores every part as a plain tensor in `exact_dtype` (the pipeline without its loss);
    a layer whose quantizer is None stores fp16 tensors.
    """

    pre_rope = True

    def __init__(self, *, quantize: bool = True, exact_dtype: torch.dtype = torch.float32):
        self.quantize = quantize
        self.exact_dtype = exact_dtype
        self._zero_maps: dict = {}  # (device, width) -> the zero prediction in aqua_reconstruct's layout

    def _quantizer(self, layer_idx: int) -> HiggsQuantizer | None:
        raise NotImplementedError

    def _encode_part(self, layer_idx: int, x: torch.Tensor) -> tuple[Part, torch.Tensor]:
        """x: [B, T, C] float32 -> (stored part, its reconstruction float32)."""
        q = self._quantizer(layer_idx) if self.quantize else None
        if q is None:
            stored = compact(x.to(torch.float16 if self.quantize else self.exact_dtype))
            return stored, stored.float()
        qt = q.quantize(x)
        return qt, q.dequantize(qt)

    def _decode_part(self, layer_idx: int, part: Part) -> torch.Tensor:
        if isinstance(part, torch.Tensor):
            return part.float()
        return self._quantizer(layer_idx).dequantize(part)

    decodes_ranges = True

    def decode_range(self, layer_idx, store, start, stop, prev):
        def rows(x: torch.Tensor) -> torch.Tensor:
            return x[:, start:stop]  # a view: the block is read in place
        return self.decode(layer_idx, HiggsStore(_part_map(store.keys, rows), _part_map(store.values, rows)), prev)

    # decode_block below: what its fused op predicts, in which dtype
    fused_decode_block = True
    predictor_dtype = torch.float32
    num_kv_heads: int

    def _op_map(self, layer_idx: int, kind: str, device: torch.device, width: int):
        """(weights, up, bias) of the prediction added to a layer's key or value residual, in aqua_reconstruct's
        layout: none here (states quantized directly)."""
        key = (device, width)
        if key not in self._zero_maps:  # kept: decode_block asks twice per layer and block
            self._zero_maps[key] = ([], None, torch.zeros(width, dtype=torch.float32, device=device))
        return self._zero_maps[key]

    def decode_block(self, layer_idx, store, start, stop, prev, cos, sin, dtype, hat, out=None):
        """One fused `aquakv.ops.aqua_reconstruct` per part: dequantize, predict (`_op_map`; HIGGS alone predicts
        zero), add, re-rotate (keys) and write in the model's dtype, with the reconstruction written for the next
        layer, in one pass. Layers the op does not serve (stored unquantized, groups padded past C, partial rotary)
        take the composed path. The op reads its inputs in the predictor dtype and writes float32 reconstructions;
        a chain kept in another dtype (blockwise caches keep it in their storage dtype) passes through copies of
        this block only."""
        q = self._quantizer(layer_idx) if self.quantize else None
        hat_rows = None if hat is None else (_rows_view(hat[0]), _rows_view(hat[1]))
        c, h = store.keys.shape[-1], self.num_kv_heads
        if (q is None or not isinstance(store.keys, QuantizedTensor) or c % q.settings.group_size
                or (hat_rows is not None and None in hat_rows) or (cos is not None and cos.shape[-1] != c // h)):
            return super().decode_block(layer_idx, store, start, stop, prev, cos, sin, dtype, hat, out)
        kept = hat_rows  # where the next layer reads this block's reconstruction
        if hat_rows is not None and hat_rows[0].dtype != torch.float32:
            hat_rows = tuple(torch.empty(r.shape, dtype=torch.float32, device=r.device) for r in hat_rows)
        b, t, _ = store.keys.shape
        n = stop - start
        device = store.keys.device
        grid, signs = q._grid_and_signs(device)
        mm = self.predictor_dtype
        prev_k, prev_v = (None, None) if prev is None else (_chain_rows(prev[0], mm), _chain_rows(prev[1], mm))
        if out is None:
            keys = torch.empty((b, h, n, c // h), dtype=dtype, device=device)
            values = torch.empty_like(keys)
        else:
            keys, values = out
        key_map, value_map = (self._op_map(layer_idx, kind, device, c) for kind in ("key", "value"))
        k_hat, v_hat = hat_rows or (None, None)
        if k_hat is None and value_map[0]:  # the value predictor reads this layer's keys even when nobody keeps them
            k_hat = torch.empty((b, n, c), dtype=torch.float32, device=device)
        for part, dest, hat_out, inputs, rotation, (weights, up, bias) in (
                (store.keys, keys, k_hat, lambda: (prev_k,), (cos, sin), key_map),
                (store.values, values, v_hat, lambda: (k_hat.to(mm), prev_v), (None, None), value_map)):
            inputs = inputs() if weights else ()  # the value part reads the keys the key part has just written
            codes = part.codes.view(b, t, -1)[:, start:stop]
            scales = part.scales.view(b, t, -1)[:, start:stop]
            ops.aqua_reconstruct(codes, scales, grid, signs, q.settings.group_size, inputs=list(inputs[:len(weights)]),
                                 weights=weights, up=up, bias=bias, out=dest, cos=rotation[0], sin=rotation[1],
                                 hat_out=hat_out)
        if kept is not hat_rows:
            kept[0].copy_(hat_rows[0])
            kept[1].copy_(hat_rows[1])
        return keys, values

    def append(self, store, new):
        if store is None:
            return new
        return HiggsStore(_part_cat(store.keys, new.keys), _part_cat(store.values, new.values))

    def select_batch(self, store, index):
        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, index.to(x.device))
        return HiggsStore(_part_map(store.keys, pick), _part_map(store.values, pick))

    def truncate(self, store, n_tokens):
        def cut(x: torch.Tensor) -> torch.Tensor:
            return compact(x[:, :n_tokens])  # not a view: the cut tokens' bytes are freed
        return HiggsStore(_part_map(store.keys, cut), _part_map(store.values, cut))

    def num_tokens(self, store):
        return store.num_tokens

    def nbytes(self, store):
        return _part_nbytes(store.keys) + _part_nbytes(store.values)


def _chain_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D] in `dtype`: a view when the chain is already rows of that dtype (no copy)."""
    rows = _rows_view(x)
    return _rows(x).to(dtype) if rows is None else rows.to(dtype)


def _rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """[B, H, T, D] -> a [B, T, H*D] view of the same memory (writes land in x), or None when x is not laid out as
    rows."""
    b, h, t, d = x.shape
    try:
        return x.transpose(1, 2).view(b, t, h * d)
    except RuntimeError:
        return None


class HiggsCodec(HiggsRowsCodec):
    """HIGGS alone: every layer's keys (pre-RoPE) and values quantized directly, K^_l = Q_l(K_l).

    quantizers: one per layer (None: that layer is stored in fp16); num_kv_heads: H of the [B, H, T, D] states.
    Layers are independent, so nothing of the previous layer is needed or kept.
    """

    needs_previous_layer = False

    def __init__(self, quantizers: Sequence[HiggsQuantizer | None], num_kv_heads: int, *, quantize: bool = True,
                 exact_dtype: torch.dtype = torch.float32):
        super().__init__(quantize=quantize, exact_dtype=exact_dtype)
        self.quantizers = list(quantizers)
        self.num_kv_heads = num_kv_heads

    def _quantizer(self, layer_idx: int) -> HiggsQuantizer | None:
        return self.quantizers[layer_idx]

    def encode(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, prev: KV | None
               ) -> tuple[HiggsStore, torch.Tensor, torch.Tensor]:
        k_part, k_hat = self._encode_part(layer_idx, _rows(keys.float()))
        v_part, v_hat = self._encode_part(layer_idx, _rows(values.float()))
        h = keys.shape[1]
        return HiggsStore(k_part, v_part), _heads(k_hat, h), _heads(v_hat, h)

    def decode(self, layer_idx: int, store: HiggsStore, prev: KV | None) -> KV:
        h = self.num_kv_heads
        return (_heads(self._decode_part(layer_idx, store.keys), h),
                _heads(self._decode_part(layer_idx, store.values), h))

    def __repr__(self) -> str:
        first, rest = (q or "fp16" for q in (self.quantizers[0], self.quantizers[-1]))
        return f"HiggsCodec({len(self.quantizers)} layers, layer 0: {first}, others: {rest})"


class HiggsCache(ChunkedKVCache):
    """HIGGS without adapters: every layer's states quantized directly (the AQUA-KV ablation; the same numbers as
    `AquaKVCache(model, AquaKVPredictors.zeros(model, bits, ...))`, without keeping any layer's reconstruction).

    layer0_bits: None quantizes layer 0 at `bits` like the others; a number or "fp16" treats it apart.
    quantize=False stores exact states in the model's dtype. Other keyword arguments (sinks, buffer,
    storage_dtype, rotary) go to `ChunkedKVCache`.
    """

    def __init__(self, model, bits: float = 2, *, grid_dim: int = 2, group_size: int | None = None,
                 layer0_bits: float | str | None = None, seed: int = 0, quantize: bool = True, **kwargs):
        # The zero predictors carry the settings (default group size, layer-0 bits) and validate them.
        zeros = AquaKVPredictors.zeros(model, bits, grid_dim=grid_dim, group_size=group_size,
                                       layer0_bits=layer0_bits, seed=seed)
        model_dtype = next(model.parameters()).dtype
        if not quantize and kwargs.get("storage_dtype") is None:
            kwargs["storage_dtype"] = model_dtype
        codec = HiggsCodec([zeros.quantizer(layer) for layer in range(zeros.num_layers)], zeros.num_kv_heads,
                           quantize=quantize, exact_dtype=model_dtype)
        super().__init__(model, codec, **kwargs)
        self.settings = zeros.settings
