"""How one layer's tokens sit in a vLLM page: every token is one row of bytes, the codec's store for that token.

    token row (layer l, B_l bytes)     quantized layer                        exact layer (no quantizer)
    +------------+------------+------------+------------+           +-------------+-------------+
    | key codes  | value codes| key scales | val scales |           | keys fp16   | values fp16 |
    | packed     | packed     | fp16/group | fp16/group |           | C values    | C values    |
    +------------+------------+------------+------------+           +-------------+-------------+

Rows hold all KV heads of a token (C = heads * head_dim, keys before RoPE), as the codec stores them: the
predictors mix heads, so a token is coded as a whole. A vLLM page of one layer is [block_size, B_l] bytes, and
B_l is the layer's own (layer 0 is often coded at more bits). Nothing here imports vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aquakv.kv.aqua_codec import AquaKVCodec
from aquakv.kv.higgs_store import HiggsStore
from aquakv.quantizer import HiggsQuantizer, QuantizedTensor


@dataclass(frozen=True)
class RowLayout:
    """Byte offsets of one layer's token row. code_bytes/scale_count are per part (keys or values); a layer without
    a quantizer stores both parts as fp16 (code_bytes = 2 C, scale_count = 0, quantizer None)."""

    width: int  # C
    code_bytes: int
    scale_count: int
    quantizer: HiggsQuantizer | None

    @property
    def row_bytes(self) -> int:
        return 2 * self.code_bytes + 4 * self.scale_count

    @classmethod
    def of_layer(cls, codec: AquaKVCodec, layer_idx: int) -> "RowLayout":
        width = codec.predictors.kv_width
        q = codec.quantizers[layer_idx]
        if q is None:
            return cls(width, 2 * width, 0, None)
        probe = q.quantize(torch.randn(1, width, generator=torch.Generator().manual_seed(0)))
        return cls(width, probe.codes.shape[-1], probe.scales.shape[-1], q)

    # ---- rows <-> store --------------------------------------------------------------------------------
    def pack(self, store: HiggsStore) -> torch.Tensor:
        """A store of [1, T, C] tokens -> rows uint8 [T, row_bytes]."""
        if self.quantizer is None:
            return torch.cat([_as_bytes(p.reshape(-1, self.width).to(torch.float16)) for p in (store.keys,
                                                                                              store.values)], 1)
        k, v = store.keys, store.values
        return torch.cat([k.codes, v.codes, _as_bytes(k.scales), _as_bytes(v.scales)], 1)

    def unpack(self, rows: torch.Tensor) -> HiggsStore:
        """rows uint8 [T, row_bytes] -> a store of [1, T, C] tokens (parts copied out of the rows, compact)."""
        t, c = rows.shape[0], self.width
        if self.quantizer is None:
            keys = rows[:, :2 * c].contiguous().view(torch.float16).view(1, t, c)
            values = rows[:, 2 * c:].contiguous().view(torch.float16).view(1, t, c)
            return HiggsStore(keys, values)
        b, s = self.code_bytes, 2 * self.scale_count
        cuts = (rows[:, :b], rows[:, b:2 * b], rows[:, 2 * b:2 * b + s], rows[:, 2 * b + s:])
        codes_k, codes_v, scales_k, scales_v = (x.contiguous() for x in cuts)
        shape, settings = torch.Size((1, t, c)), self.quantizer.settings

        def part(codes, scales):
            return QuantizedTensor(codes, scales.view(torch.float16), shape, torch.float32, settings)
        return HiggsStore(part(codes_k, scales_k), part(codes_v, scales_v))


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """[T, n] fp16 -> [T, 2 n] uint8, the same bytes."""
    return x.contiguous().view(torch.uint8)


def layer_layouts(codec: AquaKVCodec) -> list[RowLayout]:
    return [RowLayout.of_layer(codec, layer) for layer in range(codec.predictors.num_layers)]
