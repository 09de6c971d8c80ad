"""The AQUA-KV codec: each layer's tokens are predicted from the chain (the previous compressed layer's
reconstruction of the same tokens) and only the residual is HIGGS-quantized (docs/kv_cache.md).

    K^_l = P^K_l + Q(K_l - P^K_l),  V^_l = P^V_l + Q(V_l - P^V_l)   (predictors: aquakv.kv.predictors)

HIGGS alone is the same codec with a zero prediction: `AquaKVCodec(AquaKVPredictors.zeros(...))` quantizes the
states themselves and, predicting nothing, reads and keeps no chain. Storage: `aquakv.kv.higgs_store`.
"""
from __future__ import annotations

import torch

from aquakv import ops
from aquakv.kv.codec import KV, KVCodec, compact, deliver
from aquakv.kv.higgs_store import HiggsStore, Part, to_heads, to_rows
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.quantizer import HiggsQuantizer, QuantizedTensor

_CPU = torch.device("cpu")


class AquaKVCodec(KVCodec):
    """AQUA-KV (or, with zero predictors, HIGGS) as a `KVCodec`, storing `HiggsStore`s.

    predictors: plain data (maps, quantizer settings, which layer each layer is predicted from); zero predictors
    (`AquaKVPredictors.zeros`) make this HIGGS. quantize=False stores the residuals unquantized in `exact_dtype`
    (the whole pipeline without its loss: for tests, and to measure what quantization alone costs).
    predictor_dtype: the predictor matmuls' dtype, float32 or bfloat16 (inputs and matrices rounded to bfloat16,
    accumulated in float32: 2-4x faster on CPUs with AVX512-BF16 or AMX and on GPUs; docs/kv_cache.md has its cost).
    decode runs one fused `aquakv.ops.aqua_reconstruct` per part where the layer allows it (fused = True; the
    composed path dequantize + predict + add + rotate serves the other layers and is the tests' reference).
    """

    pre_rope = True
    fused = True

    def __init__(self, predictors: AquaKVPredictors, *, quantize: bool = True,
                 exact_dtype: torch.dtype = torch.float32, predictor_dtype: torch.dtype = torch.float32):
        if predictor_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AquaKVCodec: predictor_dtype must be torch.float32 or torch.bfloat16, got "
                             f"{predictor_dtype}")
        self.predictors = predictors
        self.quantize, self.exact_dtype, self.predictor_dtype = quantize, exact_dtype, predictor_dtype
        self.num_kv_heads = predictors.num_kv_heads
        self.needs_previous_layer = predictors.has_adapters  # zero predictors (HIGGS) read no chain
        exact = set(predictors.exact_layers)
        # Keys and values of a layer have their own quantizers: they differ only with per-layer widths
        # (settings.key_bits / value_bits); both share group size and seed, hence the Hadamard signs.
        self.quantizers = [None if layer in exact else predictors.quantizer(layer, "keys")
                           for layer in range(predictors.num_layers)]
        self.value_quantizers = [None if layer in exact else predictors.quantizer(layer, "values")
                                 for layer in range(predictors.num_layers)]
        # What the fused decode reads, gathered once here (per device in _fused_inputs): each layer's key grid, value
        # grid and signs, and its key and value maps in the op's layout (zero: no inputs, zero bias).
        zero = ([], None, torch.zeros(predictors.kv_width, dtype=torch.float32))
        self._fused_base = [None if q is None or qv is None else
                            (*q.grid_and_signs(_CPU), qv.grid_and_signs(_CPU)[0],
                             *(zero if m is None else m.op_weights() for m in
                               (predictors.key_maps[layer], predictors.value_maps[layer])))
                            for layer, (q, qv) in enumerate(zip(self.quantizers, self.value_quantizers))]
        self._fused_on: dict = {}  # (layer, device) -> the same on that device, matrices in predictor_dtype

    # ---- encode ----------------------------------------------------------------------------------------
    def _chain_rows(self, layer_idx: int, chain: KV | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if chain is None:
            if self.needs_previous_layer and self.predictors.sources[layer_idx] is not None:
                raise RuntimeError(f"AquaKVCodec: layer {layer_idx} needs layer "
                                   f"{self.predictors.sources[layer_idx]}'s reconstruction (the chain)")
            return None, None
        return to_rows(chain[0]), to_rows(chain[1])  # in the chain's dtype: the maps cast it to the matmuls'

    def _quantizer(self, layer_idx: int, part: str) -> HiggsQuantizer | None:
        return (self.quantizers if part == "keys" else self.value_quantizers)[layer_idx]

    def _encode_part(self, layer_idx: int, x: torch.Tensor, part: str) -> tuple[Part, torch.Tensor]:
        """x: [B, T, C] float32 -> (stored part, its reconstruction float32). part: "keys" or "values"."""
        q = self._quantizer(layer_idx, part) if self.quantize else None
        if q is None:
            stored = compact(x.to(torch.float16 if self.quantize else self.exact_dtype))
            return stored, stored.float()
        qt = q.quantize(x)
        return qt, q.dequantize(qt)

    @staticmethod
    def _add(pred: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return x if pred is None else pred + x

    def encode(self, layer_idx, keys, values, chain):
        preds, mm = self.predictors, self.predictor_dtype
        prev_k, prev_v = self._chain_rows(layer_idx, chain)
        k, v = to_rows(keys.float()), to_rows(values.float())
        pk = preds.predict_keys(layer_idx, prev_k, like=k, matmul_dtype=mm)
        k_part, k_res = self._encode_part(layer_idx, k if pk is None else k - pk, "keys")
        k_hat = self._add(pk, k_res)
        pv = preds.predict_values(layer_idx, k_hat, prev_v, matmul_dtype=mm)
        v_part, v_res = self._encode_part(layer_idx, v if pv is None else v - pv, "values")
        v_hat = self._add(pv, v_res)
        h = keys.shape[1]
        return HiggsStore(k_part, v_part), to_heads(k_hat, h), to_heads(v_hat, h)

    # ---- decode ----------------------------------------------------------------------------------------
    def decode(self, layer_idx, store, chain, *, start=0, stop=None, cos=None, sin=None, dtype=torch.float32,
               chain_out=None, out=None):
        """`KVCodec.decode`: one fused aquakv.ops.aqua_reconstruct per part (dequantize, predict, add, re-rotate
        the keys, write in `dtype`, and the reconstruction into chain_out, in one pass) where the layer allows it;
        the composed path for layers stored unquantized, groups padded past C, or partial rotary."""
        stop = store.num_tokens if stop is None else stop
        q = self.quantizers[layer_idx] if self.quantize else None
        if q is not None and self.value_quantizers[layer_idx] is None:
            q = None  # a part kept in fp16: the composed path serves it
        chain_rows = None if chain_out is None else (_rows_view(chain_out[0]), _rows_view(chain_out[1]))
        c = store.keys.shape[-1]
        if (not self.fused or q is None or not isinstance(store.keys, QuantizedTensor) or c % q.settings.group_size
                or (chain_rows is not None and None in chain_rows)
                or (cos is not None and cos.shape[-1] != c // self.num_kv_heads)):
            k_hat, v_hat = self._reconstruct(layer_idx, store.rows(start, stop), chain)
            return deliver(k_hat, v_hat, cos=cos, sin=sin, dtype=dtype, chain_out=chain_out, out=out)
        return self._decode_fused(layer_idx, store, chain, start, stop, cos, sin, dtype, chain_rows, out)

    def _reconstruct(self, layer_idx: int, store: HiggsStore, chain: KV | None) -> KV:
        """The composed decode of every token of `store` -> (keys_hat, values_hat) [B, H, T, D] float32, un-rotated."""
        preds, mm = self.predictors, self.predictor_dtype
        prev_k, prev_v = self._chain_rows(layer_idx, chain)
        k_res = self._dequantize(layer_idx, store.keys, "keys")
        k_hat = self._add(preds.predict_keys(layer_idx, prev_k, like=k_res, matmul_dtype=mm), k_res)
        v_res = self._dequantize(layer_idx, store.values, "values")
        v_hat = self._add(preds.predict_values(layer_idx, k_hat, prev_v, matmul_dtype=mm), v_res)
        h = self.num_kv_heads
        return to_heads(k_hat, h), to_heads(v_hat, h)

    def _dequantize(self, layer_idx: int, stored: Part, part: str) -> torch.Tensor:
        if isinstance(stored, torch.Tensor):
            return stored.float()
        return self._quantizer(layer_idx, part).dequantize(stored)

    def _fused_inputs(self, layer_idx: int, device: torch.device):
        """(key grid, signs, value grid, key map, value map) of a layer on `device`, each map (weights, up, bias) in
        the op's layout with its matrices in the predictor dtype and its bias in float32 (kept per device)."""
        key = (layer_idx, device)
        if key not in self._fused_on:
            grid, signs, value_grid, *maps = self._fused_base[layer_idx]
            mm = self.predictor_dtype

            def placed(weights, up, bias):
                return ([w.to(device=device, dtype=mm).contiguous() for w in weights],
                        None if up is None else up.to(device=device, dtype=mm).contiguous(),
                        bias.to(device=device, dtype=torch.float32).contiguous())
            self._fused_on[key] = (grid.to(device), signs.to(device), value_grid.to(device), *(placed(*m) for m in maps))
        return self._fused_on[key]

    def _decode_fused(self, layer_idx, store, chain, start, stop, cos, sin, dtype, chain_rows, out) -> KV:
        """The op reads its inputs in the predictor dtype and writes float32 reconstructions; a chain kept in
        another dtype (blockwise caches keep it in their storage dtype) passes through copies of this block only."""
        q = self.quantizers[layer_idx]
        kept = chain_rows  # where the next layer reads this block's reconstruction
        if chain_rows is not None and chain_rows[0].dtype != torch.float32:
            chain_rows = tuple(torch.empty(r.shape, dtype=torch.float32, device=r.device) for r in chain_rows)
        b, t, c = store.keys.shape
        h, n, device, mm = self.num_kv_heads, stop - start, store.keys.device, self.predictor_dtype
        key_grid, signs, value_grid, key_map, value_map = self._fused_inputs(layer_idx, device)
        prev_k, prev_v = (None, None) if chain is None else (_chain_rows(chain[0], mm), _chain_rows(chain[1], mm))
        if out is None:
            keys = torch.empty((b, h, n, c // h), dtype=dtype, device=device)
            values = torch.empty_like(keys)
        else:
            keys, values = out
        k_hat, v_hat = chain_rows or (None, None)
        if k_hat is None and value_map[0]:  # the value predictor reads this layer's keys even when nobody keeps them
            k_hat = torch.empty((b, n, c), dtype=torch.float32, device=device)
        # One op call per part, each with its own grid: keys and values may be coded at different widths.
        for part, grid, dest, hat_out, inputs, rotation, (weights, up, bias) in (
                (store.keys, key_grid, keys, k_hat, lambda: (prev_k,), (cos, sin), key_map),
                (store.values, value_grid, values, v_hat, lambda: (k_hat.to(mm), prev_v), (None, None), value_map)):
            inputs = inputs() if weights else ()  # the value part reads the keys the key part has just written
            codes = part.codes.view(b, t, -1)[:, start:stop]
            scales = part.scales.view(b, t, -1)[:, start:stop]
            ops.aqua_reconstruct(codes, scales, grid, signs, q.settings.group_size, inputs=list(inputs[:len(weights)]),
                                 weights=weights, up=up, bias=bias, out=dest, cos=rotation[0], sin=rotation[1],
                                 hat_out=hat_out)
        if kept is not chain_rows:
            kept[0].copy_(chain_rows[0])
            kept[1].copy_(chain_rows[1])
        return keys, values

    # ---- store edits -----------------------------------------------------------------------------------
    def append(self, store, new):
        return new if store is None else store.append(new)

    def select_batch(self, store, index):
        return store.select_batch(index)

    def truncate(self, store, n_tokens):
        return store.truncate(n_tokens)

    def num_tokens(self, store):
        return store.num_tokens

    def nbytes(self, store):
        return store.nbytes

    def __repr__(self) -> str:
        kind = "AQUA-KV" if self.needs_previous_layer else "HIGGS (zero prediction)"
        return f"AquaKVCodec({kind}, {len(self.quantizers)} layers, predictor_dtype={self.predictor_dtype})"


def _chain_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D] in `dtype`: a view when the chain is already rows of that dtype (no copy)."""
    rows = _rows_view(x)
    return to_rows(x).to(dtype) if rows is None else rows.to(dtype)


def _rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """[B, H, T, D] -> a [B, T, H*D] view of the same memory (writes land in x), or None when x is not laid out as
    rows."""
    b, h, t, d = x.shape
    try:
        return x.transpose(1, 2).view(b, t, h * d)
    except RuntimeError:
        return None
