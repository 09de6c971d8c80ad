"""How the AQUA-KV codec (and HIGGS, the same codec with a zero prediction) stores one layer's quantized tokens:
rows [B, T, C = H*D] (heads concatenated, keys before RoPE), one "part" for the keys and one for the values, each
HIGGS codes (`QuantizedTensor`) or, on a layer without a quantizer, a plain tensor; and the store edits
(append, batch rows, truncation, bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from aquakv.kv.codec import compact
from aquakv.quantizer import QuantizedTensor

Part = QuantizedTensor | torch.Tensor  # one of K or V for [B, T, C] tokens: HIGGS codes, or a plain tensor


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, C = H*D] (heads concatenated, as k_proj/v_proj lay them out)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, C] -> [B, H, T, D]."""
    b, t, c = x.shape
    return x.reshape(b, t, num_heads, c // num_heads).transpose(1, 2)


def part_map(part: Part, fn: Callable[[torch.Tensor], torch.Tensor]) -> Part:
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
    """Quantized tokens of one layer: keys and values [B, T, C] as HIGGS codes (of AQUA-KV's residuals, or of the
    states themselves under a zero prediction), or as plain tensors where the layer has no quantizer."""

    keys: Part
    values: Part

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    def rows(self, start: int, stop: int) -> "HiggsStore":
        """Tokens [start, stop) as views (the block is read in place)."""
        def cut(x: torch.Tensor) -> torch.Tensor:
            return x[:, start:stop]
        return HiggsStore(part_map(self.keys, cut), part_map(self.values, cut))

    def append(self, new: "HiggsStore") -> "HiggsStore":
        return HiggsStore(_part_cat(self.keys, new.keys), _part_cat(self.values, new.values))

    def select_batch(self, index: torch.Tensor) -> "HiggsStore":
        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, index.to(x.device))
        return HiggsStore(part_map(self.keys, pick), part_map(self.values, pick))

    def truncate(self, n_tokens: int) -> "HiggsStore":
        def cut(x: torch.Tensor) -> torch.Tensor:
            return compact(x[:, :n_tokens])  # not a view: the cut tokens' bytes are freed
        return HiggsStore(part_map(self.keys, cut), part_map(self.values, cut))

    @property
    def nbytes(self) -> int:
        return _part_nbytes(self.keys) + _part_nbytes(self.values)
