"""The torch-only HIGGS pipeline the fused ops are measured against (bench/README.md).

What one writes without custom kernels: rotate by a matmul with the dense Hadamard matrix, pick the
nearest grid point by an argmax over all points (2<y, g> - ||g||^2), pack bits with shifts and sums.
Same semantics as torch.ops.aquakv.higgs_quantize / higgs_dequantize (csrc/ops.cpp), so its
outputs can be checked against ours (they differ only at float32 near-ties of the argmax).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int, device: str) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix [n, n] (float32), symmetric: H = H^T, H H = n I."""
    h = torch.ones((1, 1), dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


def _bit_weights(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(bits, device=device, dtype=torch.int32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int [..., m] with m * bits % 8 == 0 -> uint8 [..., m * bits / 8], LSB-first."""
    stream = (codes[..., None].to(torch.int32) >> _bit_weights(bits, codes.device)) & 1
    stream = stream.reshape(*codes.shape[:-1], -1, 8)
    return (stream << _bit_weights(8, codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., nbytes] -> int64 codes [..., nbytes * 8 / bits]."""
    stream = (packed[..., None].to(torch.int32) >> _bit_weights(8, packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1, bits)
    return (stream << _bit_weights(bits, packed.device)).sum(-1).long()


def quantize(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] -> (codes uint8 [..., C/d*b/8], scales fp16 [..., C/G]), like aquakv's op."""
    n, d = grid.shape
    bits = n.bit_length() - 1
    lead, c = x.shape[:-1], x.shape[-1]
    xg = x.reshape(-1, group_size).float() * signs
    s = xg.norm(dim=-1, keepdim=True)
    y = (xg @ hadamard_matrix(group_size, str(x.device))) / torch.where(s > 0, s, torch.ones_like(s))
    yv = y.reshape(-1, d)
    codes = (2 * yv @ grid.T - (grid * grid).sum(-1)).argmax(-1)  # first maximum: lowest index on ties
    packed = pack_bits(codes.reshape(*lead, c // d), bits)
    return packed, s.reshape(*lead, c // group_size).half()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`: x = s / G * D * H grid[codes]."""
    n, d = grid.shape
    bits = n.bit_length() - 1
    y = grid[unpack_bits(codes, bits)].reshape(-1, group_size)
    x = (y @ hadamard_matrix(group_size, str(codes.device))) * (scales.reshape(-1, 1).float() / group_size) * signs
    return x.reshape(*scales.shape[:-1], scales.shape[-1] * group_size).to(dtype)


def hadamard(x: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * H x over the last dim by a dense matmul in x's dtype (the dense fp16 matmul baseline)."""
    h = hadamard_matrix(x.shape[-1], str(x.device)).to(x.dtype)
    return (x @ h) * scale
