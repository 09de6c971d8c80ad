"""higgs_linear (reference): a linear layer whose weight is given by HIGGS codes, float64 inside.

    W = higgs_dequantize(codes, scales, grid, signs, G)      [out, in], each group inside one row
    y = x W^T + bias                                         [..., out], rounded once to x's dtype

`higgs_linear_abs_terms` gives the two sums the accuracy bound of docs/ops.md is stated over.
"""
from __future__ import annotations

import numpy as np

from aquakv.reference.bitpack import unpack_bits
from aquakv.reference.hadamard import hadamard
from aquakv.reference.higgs import higgs_dequantize


def higgs_linear(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, grid: np.ndarray, signs: np.ndarray,
                 group_size: int, bias: np.ndarray | None = None, dtype: type = np.float32) -> np.ndarray:
    """x [..., in], codes uint8 [out, in/d*code_bits/8], scales float16 [out, in/G] -> [..., out] in dtype."""
    weight = higgs_dequantize(codes, scales, grid, signs, group_size, np.float64)  # [out, in]
    y = np.asarray(x, np.float64) @ weight.T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y.astype(dtype)


def higgs_linear_abs_terms(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, grid: np.ndarray,
                           signs: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dot, rot) [..., out]: dot = sum_g |s_jg|/G * sum_i |xr_gi| |q_jgi|, the absolute terms of the
    code-domain products (xr = H(signs x_g), q = grid[codes]); rot = sum_g |s_jg|/G * sum_i |q_jgi| * ||x_g||_1,
    what the float32 rotation's error (at most log2(G) roundings deep per element of xr) is multiplied by."""
    grid = np.asarray(grid, np.float64)
    n, d = grid.shape
    scales = np.asarray(scales, np.float16).astype(np.float64)
    out, groups = scales.shape
    q = np.abs(grid[unpack_bits(codes, n.bit_length() - 1, groups * group_size // d)]).reshape(out, groups, group_size)
    xg = np.asarray(x, np.float64).reshape(*np.shape(x)[:-1], groups, group_size)
    xr = np.abs(hadamard(xg, np.asarray(signs, np.float64), scale=1.0))
    weight = np.abs(scales)[..., None] / group_size * q  # [out, groups, G]
    dot = np.einsum("...gi,jgi->...j", xr, weight)
    rot = np.einsum("...g,jg->...j", np.abs(xg).sum(-1), weight.sum(-1))
    return dot, rot
