"""Python face of the compiled ops `torch.ops.aquakv.*` (schemas: csrc/ops.cpp).

Each function here is a thin call into the op; this module adds the docstrings with shapes and
the fake (meta) kernels that let `torch.compile(fullgraph=True)` trace the ops. The NumPy truth
they are tested against lives in `aquakv.reference`.

Conventions: "rows" are all leading dims; ops work on the last dim. Non-contiguous inputs are
accepted (copied once); inputs with zero rows give empty outputs of the right shape.
"""
from __future__ import annotations

import torch

from aquakv import _C  # noqa: F401  (loads the library that defines torch.ops.aquakv.*)

__all__ = ["hadamard", "higgs_quantize", "higgs_dequantize", "pack_bits", "unpack_bits"]


def hadamard(x: torch.Tensor, signs: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """y = scale * H (signs * x) over the last dim; H the unnormalised +-1 Sylvester Hadamard matrix.

    x: [..., n] float32/float16/bfloat16, n a power of two in 2..32768; signs: float32 [n] or None.
    scale = n ** -0.5 makes the transform orthonormal (and its own inverse).
    Returns [..., n] in x's dtype, computed in float32.
    """
    return torch.ops.aquakv.hadamard(x, signs, scale)


def higgs_quantize(
    x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused HIGGS quantize (rotate, normalise, nearest grid point, pack), per group of G values.

    x: [..., C] float32/float16/bfloat16 with C % G == 0; grid: float32 [n, d] with n = 2**b
    (b in 1..8 or 16); signs: float32 [G]; G a power of two with G % d == 0 and (G/d*b) % 8 == 0.
    Returns (codes uint8 [..., C/d*b/8], scales float16 [..., C/G]). A group holding NaN/Inf gets a
    non-finite scale, and so does one whose norm exceeds the float16 range (65504).
    """
    return torch.ops.aquakv.higgs_quantize(x, grid, signs, group_size)


def higgs_dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    signs: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `higgs_quantize`: codes uint8 [..., C/d*b/8], scales float16 [..., C/G] -> [..., C] in dtype."""
    return torch.ops.aquakv.higgs_dequantize(codes, scales, grid, signs, group_size, dtype)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int32 [..., count] (low `bits` bits kept), bits in 1..8 or 16 -> uint8 [..., ceil(count*bits/8)].

    LSB-first bitstream per row: code i fills bits [i*bits, (i+1)*bits), bit k in bit k%8 of byte k//8.
    """
    return torch.ops.aquakv.pack_bits(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """packed: uint8 [..., ceil(count*bits/8)] -> int32 [..., count]; inverse of `pack_bits`."""
    return torch.ops.aquakv.unpack_bits(packed, bits, count)


# ---- fake kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing -------------


def _grid_bits(grid: torch.Tensor) -> int:
    n = grid.shape[0]
    torch._check(n >= 2 and (n & (n - 1)) == 0, lambda: f"grid has {n} points; it must have 2**bits points")
    return int(n).bit_length() - 1


@torch.library.register_fake("aquakv::hadamard")
def _hadamard_fake(x: torch.Tensor, signs: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("aquakv::higgs_quantize")
def _higgs_quantize_fake(
    x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    bits, d = _grid_bits(grid), grid.shape[1]
    channels = x.shape[-1]
    torch._check(
        channels % group_size == 0,
        lambda: f"higgs_quantize: last dim {channels} is not a multiple of group_size {group_size}",
    )
    lead = x.shape[:-1]
    codes = x.new_empty((*lead, channels // d * bits // 8), dtype=torch.uint8)
    scales = x.new_empty((*lead, channels // group_size), dtype=torch.float16)
    return codes, scales


@torch.library.register_fake("aquakv::higgs_dequantize")
def _higgs_dequantize_fake(
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    signs: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return scales.new_empty((*scales.shape[:-1], scales.shape[-1] * group_size), dtype=dtype)


@torch.library.register_fake("aquakv::pack_bits")
def _pack_bits_fake(codes: torch.Tensor, bits: int) -> torch.Tensor:
    count = codes.shape[-1]
    return codes.new_empty((*codes.shape[:-1], (count * bits + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("aquakv::unpack_bits")
def _unpack_bits_fake(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    return packed.new_empty((*packed.shape[:-1], count), dtype=torch.int32)
