"""HIGGS quantize / dequantize (reference), docs/method.md line by line, float64 inside.

Per group x_g of G values (x: [..., C], C a multiple of G):
  s = ||x_g||_2; stored as fp16(s), but y uses the unrounded s
  y = sqrt(G) / s * H_orth(D x_g)          (y = 0 when s == 0)
  code_i = argmin_j ||y_i - g_j||^2        over the G/d sub-vectors y_i (lowest j on exact ties)
  codes packed LSB-first at code_bits = log2(n) bits per d-dim code (see reference.bitpack)
Dequantize: x^_g = s16 / sqrt(G) * D * H_orth^T g[code], with s16 the stored fp16 scale.
Quantize with given scales (higgs_quantize_scaled): the same search with y = sqrt(G) / s16 * H_orth(D x_g)
for the caller's fp16 s16 (y = 0 where s16 == 0), e.g. to re-encode weights under their current scales.
"""
from __future__ import annotations

import numpy as np

from aquakv.reference.bitpack import pack_bits, unpack_bits
from aquakv.reference.hadamard import hadamard


def _code_bits_of(grid: np.ndarray) -> int:
    """code_bits = log2(n points): the bits of one d-dim code (not bits per value)."""
    n = grid.shape[0]
    if n < 2 or n & (n - 1):
        raise ValueError(f"grid has {n} points; it must have 2**code_bits points")
    return n.bit_length() - 1


def nearest_grid_codes(y: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest grid point of each d-vector, and how clear the win was.

    y: [..., m, d], grid: [n, d]. Returns (codes int64 [..., m], margin float64 [..., m]) where
    margin = (second-best - best) squared distance; a small margin flags a true near-tie, where
    any correct float32 kernel may pick either point.
    """
    y = np.asarray(y, np.float64)
    grid = np.asarray(grid, np.float64)
    n, d = grid.shape
    flat = y.reshape(-1, d)
    codes = np.empty(len(flat), np.int64)
    margin = np.empty(len(flat), np.float64)
    chunk = max(1, 2**22 // (n * d))  # bounds the [chunk, n, d] temporary to 32 MiB
    for start in range(0, len(flat), chunk):
        dist = ((flat[start : start + chunk, None, :] - grid) ** 2).sum(axis=-1)  # [chunk, n]
        codes[start : start + chunk] = np.argmin(dist, axis=-1)  # first minimum: lowest index wins ties
        two_best = np.partition(dist, 1, axis=-1)[:, :2]
        margin[start : start + chunk] = two_best[:, 1] - two_best[:, 0]
    return codes.reshape(y.shape[:-1]), margin.reshape(y.shape[:-1])


def _groups(x: np.ndarray, group_size: int) -> np.ndarray:
    """[..., C] -> [..., C/G, G]."""
    c = x.shape[-1]
    if c % group_size:
        raise ValueError(f"higgs_quantize: last dim {c} is not a multiple of group_size {group_size}")
    return x.reshape(*x.shape[:-1], c // group_size, group_size)


def rotated_normalised(x: np.ndarray, signs: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """y = sqrt(G)/s * H_orth(D x_g) per group, and s = ||x_g||. x: [..., C] -> ([..., C/G, G], [..., C/G])."""
    xg = _groups(np.asarray(x, np.float64), group_size)
    s = np.sqrt((xg**2).sum(axis=-1))
    h_orth = hadamard(xg, signs, scale=1.0 / np.sqrt(group_size))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(s[..., None] > 0, np.sqrt(group_size) / s[..., None] * h_orth, 0.0)
    return y, s


def rotated_scaled(x: np.ndarray, scales: np.ndarray, signs: np.ndarray, group_size: int) -> np.ndarray:
    """y = sqrt(G)/s * H_orth(D x_g) per group for given scales s (float16 [..., C/G]); y = 0 where s == 0.
    x: [..., C] -> [..., C/G, G]. A NaN scale gives NaN y (code 0); an infinite one gives y = 0."""
    xg = _groups(np.asarray(x, np.float64), group_size)
    s = np.asarray(scales, np.float16).astype(np.float64)[..., None]
    h_orth = hadamard(xg, signs, scale=1.0 / np.sqrt(group_size))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s != 0, np.sqrt(group_size) / s * h_orth, 0.0)


def higgs_quantize_scaled(
    x: np.ndarray, scales: np.ndarray, grid: np.ndarray, signs: np.ndarray, group_size: int
) -> np.ndarray:
    """x: [..., C], scales float16 [..., C/G] -> codes uint8 [..., C/d*code_bits/8] (nearest grid point of y)."""
    grid = np.asarray(grid, np.float64)
    d, code_bits = grid.shape[1], _code_bits_of(grid)
    y = rotated_scaled(x, scales, signs, group_size)
    codes, _ = nearest_grid_codes(y.reshape(*y.shape[:-1], group_size // d, d), grid)
    return pack_bits(codes.reshape(*np.shape(x)[:-1], np.shape(x)[-1] // d), code_bits)


def higgs_quantize(
    x: np.ndarray, grid: np.ndarray, signs: np.ndarray, group_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """x: [..., C] -> (codes uint8 [..., C/d*code_bits/8], scales float16 [..., C/G])."""
    grid = np.asarray(grid, np.float64)
    d, code_bits = grid.shape[1], _code_bits_of(grid)
    y, s = rotated_normalised(x, signs, group_size)
    codes, _ = nearest_grid_codes(y.reshape(*y.shape[:-1], group_size // d, d), grid)
    codes = codes.reshape(*np.shape(x)[:-1], np.shape(x)[-1] // d)  # groups of a row follow each other
    return pack_bits(codes, code_bits), s.astype(np.float16)


def higgs_dequantize(
    codes: np.ndarray,
    scales: np.ndarray,
    grid: np.ndarray,
    signs: np.ndarray,
    group_size: int,
    dtype: type = np.float32,
    compute_dtype: type = np.float64,
) -> np.ndarray:
    """codes uint8 [..., C/d*code_bits/8], scales float16 [..., C/G] -> [..., C] in `dtype`.

    Math in `compute_dtype` (float64: the truth; float32: a same-precision baseline for error budgets).
    """
    grid = np.asarray(grid, compute_dtype)
    d, code_bits = grid.shape[1], _code_bits_of(grid)
    scales = np.asarray(scales, np.float16).astype(compute_dtype)
    groups = scales.shape[-1]
    idx = unpack_bits(codes, code_bits, groups * group_size // d)
    y_hat = grid[idx].reshape(*scales.shape, group_size)  # [..., C/G, G]
    # x^ = s/sqrt(G) * D * H_orth^T y^ ; H_orth is symmetric, and D is applied after H.
    inv_sqrt_g = compute_dtype(1.0 / np.sqrt(group_size))
    rotated = hadamard(y_hat, None, scale=inv_sqrt_g, compute_dtype=compute_dtype)
    x_hat = scales[..., None] * inv_sqrt_g * np.asarray(signs, compute_dtype) * rotated
    return x_hat.reshape(*scales.shape[:-1], groups * group_size).astype(dtype)
