"""The discrete (V) step of PV-Tuning for one HIGGS layer: which codes to change, and to what (docs/pv_tuning.md).

A HIGGS group g of G weights is stored as a scale s_g and G/d codes; code i names the grid point nearest to the
d values y_i of the rotated, normalised group y = sqrt(G)/s * H_orth(signs * w_g). The rotation is orthonormal,
so a change of y_i by delta moves the weights by exactly s/sqrt(G) * ||delta|| in Euclidean norm: every code vector
has its own, independent share of the weight-space distance, and the V step ranks and limits changes in it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aquakv import ops


def rotate_normalise(x: torch.Tensor, scales: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = sqrt(G)/s * H_orth(signs * x_g) = H(signs * x_g) / s per group, computed as the kernel does (the
    unnormalised transform in float32, then times 1/s; y = 0 where s = 0).

    x: [R, C] float with C % G == 0; scales: [R, C/G] (any float dtype; read as float32) -> y float32 [R, C]."""
    rows, channels = x.shape
    h = ops.hadamard(x.float().reshape(-1, group_size), signs, 1.0)
    s = scales.float().reshape(-1, 1)
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return (h * inv).reshape(rows, channels)


def encode_with_scales(x: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """HIGGS codes of x under GIVEN scales: higgs_quantize's nearest-grid search with s fixed instead of measured.

    x: [R, C] float32/float16/bfloat16, C % group_size == 0; scales: float16 [R, C/G]; grid: float32 [n, d];
    signs: float32 [G]. Returns codes uint8 [R, C/d*code_bits/8], packed exactly like higgs_quantize's:
    y = sqrt(G)/s * H_orth(signs * x_g), code_i = argmin_j ||y_i - grid_j||^2 (lowest j on ties).
    With the group norms as scales this gives higgs_quantize's codes (tests/test_pv_tune.py).

    The search is the op `aquakv.ops.higgs_quantize_scaled` (CPU and CUDA kernels); this checks the shapes.
    """
    if x.dim() != 2 or x.shape[-1] % group_size:
        raise ValueError(f"encode_with_scales: x must be [rows, C] with C a multiple of group_size {group_size}, "
                         f"got {tuple(x.shape)}")
    if scales.shape != (x.shape[0], x.shape[1] // group_size):
        raise ValueError(f"encode_with_scales: scales must be [{x.shape[0]}, {x.shape[1] // group_size}] "
                         f"(one per group), got {tuple(scales.shape)}")
    return ops.higgs_quantize_scaled(x, scales, grid, signs, group_size)


@dataclass(frozen=True)
class VStepOutcome:
    """What one V step did to one layer. codes: the new packed codes [R, G/d*code_bits/8]; changed: code vectors
    whose index changed; candidates: how many were re-encoded (the top fraction); moved: the weight-space norm
    of the change the kept code changes make, ||W_new - W_old|| at fixed scales."""

    codes: torch.Tensor
    changed: int
    candidates: int
    moved: float


def max_changes(n_codes: int, max_code_change_per_step: float) -> int:
    """The number of code vectors one V step may re-encode: ceil(fraction * n_codes), at least 1."""
    return max(1, math.ceil(max_code_change_per_step * n_codes - 1e-9))


@torch.no_grad()
def v_step_codes(target: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor,
                 signs: torch.Tensor, group_size: int, *, max_code_change_per_step: float, code_trust_ratio: float,
                 weight_norm: float, select: bool = True) -> VStepOutcome:
    """Move one layer's codes towards `target` (the straight-through buffer W~, flattened into groups).

    target: float32 [R, G]; codes: uint8 [R, G/d*code_bits/8] (current); scales: float16 [R, 1] (current, after
    the P step); weight_norm: ||W|| of the layer's current dequantized weight (the trust region's unit).
    select=True (PV): rank the code vectors by s/sqrt(G) * ||y~_i - grid[c_i]||, how far the buffer has moved
    away from the current code in weight space; re-encode the top ceil(fraction * count) with encode_with_scales
    under the current scales; keep the changes in that order while ||W_new - W_old|| <= code_trust_ratio *
    weight_norm, and always keep the first. select=False (STE): every code is re-encoded, nothing is limited.
    """
    n, d = grid.shape
    code_bits = round(math.log2(n))
    rows, per_group = target.shape[0], group_size // d
    old = ops.unpack_bits(codes, code_bits, per_group).long()  # [R, m]
    if not select:
        new_codes = encode_with_scales(target, scales, grid, signs, group_size)
        new = ops.unpack_bits(new_codes, code_bits, per_group).long()
        diff = new != old
        # The move of the changed codes only (the same sum as over all, whose other terms are 0, in the same order).
        rows_changed = diff.nonzero()[:, 0]
        step = (grid[new[diff]] - grid[old[diff]]).square().sum(-1) * (
            scales.float().reshape(-1)[rows_changed].square() / group_size)
        return VStepOutcome(new_codes, int(rows_changed.numel()), old.numel(), float(step.sum().sqrt()))

    weight_scale = scales.float() / math.sqrt(group_size)  # [R, 1]: weight-space length of a unit move in y
    y = rotate_normalise(target, scales, signs, group_size).view(rows, per_group, d)
    priority = (y - grid[old]).norm(dim=-1) * weight_scale  # [R, m]
    k = min(old.numel(), max_changes(old.numel(), max_code_change_per_step))
    top = torch.topk(priority.reshape(-1), k, sorted=True).indices  # highest priority first
    touched = torch.unique(top // per_group)  # groups holding a candidate: only these are re-encoded
    fresh = encode_with_scales(target[touched], scales[touched], grid, signs, group_size)
    row_of = torch.full((rows,), -1, dtype=torch.long, device=target.device)
    row_of[touched] = torch.arange(len(touched), device=target.device)
    fresh_idx = ops.unpack_bits(fresh, code_bits, per_group).long()  # [len(touched), m]
    cand_new = fresh_idx[row_of[top // per_group], top % per_group]
    cand_old = old.reshape(-1)[top]
    differs = cand_new != cand_old
    top, cand_new, cand_old = top[differs], cand_new[differs], cand_old[differs]
    if top.numel() == 0:
        return VStepOutcome(codes, 0, k, 0.0)
    # Squared weight-space length of each change, in priority order; keep the prefix inside the trust region.
    cost = (grid[cand_new] - grid[cand_old]).square().sum(-1) * weight_scale.reshape(-1)[top // per_group].square()
    total = torch.cumsum(cost.double(), 0)
    limit = (code_trust_ratio * weight_norm) ** 2
    keep = max(1, int((total <= limit).sum()))  # cumsum is non-decreasing: the kept entries are a prefix
    flat = old.reshape(-1).clone()
    flat[top[:keep]] = cand_new[:keep]
    new_codes = ops.pack_bits(flat.view(rows, per_group).to(torch.int32), code_bits)
    return VStepOutcome(new_codes, keep, k, float(total[keep - 1].sqrt()))
