"""Asymmetric min/max uniform quantization, the one shared by the KIVI cache and RTN weights.

Per row of the last dimension (a group of values):
    min   = fp16(amin(x)),  scale = fp16((amax(x) - min) / (2**bits - 1))
    code  = clamp(round((x - min) / scale), 0, 2**bits - 1)
    x^    = code * scale + min          (float32 arithmetic on the fp16 scale and min)
Codes are computed against the fp16-rounded scale and min, exactly the numbers dequantization uses, so the
rounding is to the nearest level of the grid that will really be decoded. A row whose scale is 0 (a constant
row, or a range too small for fp16) gets code 0 everywhere and decodes exactly to its fp16 min.

`uniform_codes` / `uniform_decode` work on unpacked codes (any bits in 1..16: RTN simulates weights without
storing them); `quantize_uniform` / `dequantize_uniform` bit-pack the codes with `torch.ops.aquakv.pack_bits`
(bits 1..8 or 16), the layout every packed code of the package uses.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from aquakv.ops import pack_bits, unpack_bits

_PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


def _checked_bits(bits: int, who: str, allowed: tuple[int, ...] | range) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or bits != int(bits) or int(bits) not in allowed:
        raise ValueError(f"{who}: bits must be an integer in {tuple(allowed)}, got {bits!r}")
    return int(bits)


def uniform_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [..., g] float -> (codes int32 [..., g], scale fp16 [..., 1], minimum fp16 [..., 1]), per row of g."""
    bits = _checked_bits(bits, "uniform_codes", range(1, 17))
    levels = (1 << bits) - 1
    xf = x.float()
    minimum = xf.amin(-1, keepdim=True).half()
    scale = ((xf.amax(-1, keepdim=True) - minimum.float()) / levels).half()
    scale_f, min_f = scale.float(), minimum.float()
    # Dividing by 1 where the scale is 0 keeps the arithmetic finite; those codes are then set to 0.
    steps = torch.round((xf - min_f) / torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f)))
    codes = torch.where(scale_f > 0, steps.clamp_(0, levels), torch.zeros_like(steps))
    return codes.to(torch.int32), scale, minimum


def uniform_decode(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., g] (any integer dtype), scale and minimum fp16 [..., 1] -> x^ [..., g] in `dtype`."""
    return (codes.float() * scale.float() + minimum.float()).to(dtype)


@dataclass
class UniformQuantized:
    """x quantized along its last dim (one scale and minimum per row of `shape[-1]` values).

    codes: uint8 [..., ceil(shape[-1] * bits / 8)], bit-packed by `torch.ops.aquakv.pack_bits`;
    scale, zero: fp16 [..., 1] (zero is the row's fp16 minimum); shape: x's shape.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: torch.Size
    bits: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scale, self.zero

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "UniformQuantized":
        """Apply a batch-dim operation (reorder, select, repeat) to every stored tensor."""
        codes, scale, zero = fn(self.codes), fn(self.scale), fn(self.zero)
        return UniformQuantized(codes, scale, zero, torch.Size((codes.shape[0], *self.shape[1:])), self.bits)


def quantize_uniform(x: torch.Tensor, bits: int) -> UniformQuantized:
    """x: [..., g] float -> packed codes per row of g values with that row's min/max (fp16 scale and zero)."""
    bits = _checked_bits(bits, "quantize_uniform", _PACKABLE_BITS)
    codes, scale, minimum = uniform_codes(x, bits)
    return UniformQuantized(pack_bits(codes, bits), scale, minimum, x.shape, bits)


def dequantize_uniform(q: UniformQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """UniformQuantized -> tensor of q.shape in `dtype`."""
    codes = unpack_bits(q.codes, q.bits, q.shape[-1])
    return uniform_decode(codes, q.scale, q.zero, dtype)
