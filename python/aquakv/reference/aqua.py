"""AQUA-KV reconstruction of one block of cached tokens (reference), float64 inside by default.

Rows are [B, T] (batch, tokens); C = H * D channels (heads concatenated). Per row:
  r    = higgs_dequantize(codes, scales, grid, signs, G_q)          the quantized residual [B, T, C]
  pred = concat_g( sum_i x_i[..., g-th C_i/G slice] @ W_i[g]  (@ up[g]) ) + bias     G predictor groups
  hat  = pred + r                                                    the reconstruction the next layer reads
  out[b, h, t] = rope(hat[b, t, h*D:(h+1)*D])                        rotate-half (Llama) RoPE, or hat as is
with rope(x) = x * cos + rotate_half(x) * sin and rotate_half(x) = cat(-x[D/2:], x[:D/2]).
G = 1 is a dense map; G = H keeps head g's outputs on head g's inputs (block-diagonal).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aquakv.reference.higgs import higgs_dequantize


def aqua_prediction(
    inputs: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    up: np.ndarray | None,
    bias: np.ndarray,
    compute_dtype: type = np.float64,
) -> np.ndarray:
    """inputs [B, T, C_i], weights [G, C_i/G, M], up [G, r, C/G] or None, bias [C] -> pred [B, T, C].

    M = C/G without up, the rank r with it. No inputs: pred = bias (an intercept-only predictor).
    """
    bias = np.asarray(bias, compute_dtype)
    if len(inputs) == 0:
        return bias
    acc = None
    for x, w in zip(inputs, weights, strict=True):
        w = np.asarray(w, compute_dtype)
        g = w.shape[0]
        x = np.asarray(x, compute_dtype)
        xg = x.reshape(*x.shape[:-1], g, x.shape[-1] // g)  # [B, T, G, C_i/G]
        part = np.einsum("btgk,gkm->btgm", xg, w)
        acc = part if acc is None else acc + part
    if up is not None:
        acc = np.einsum("btgr,grn->btgn", acc, np.asarray(up, compute_dtype))
    return acc.reshape(*acc.shape[:2], -1) + bias


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE over the last dim D (even): x * cos + cat(-x[D/2:], x[:D/2]) * sin."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def aqua_reconstruct(
    codes: np.ndarray,
    scales: np.ndarray,
    grid: np.ndarray,
    signs: np.ndarray,
    group_size: int,
    inputs: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    up: np.ndarray | None,
    bias: np.ndarray,
    cos: np.ndarray | None,
    sin: np.ndarray | None,
    head_dim: int,
    compute_dtype: type = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """codes uint8 [B, T, bytes], scales float16 [B, T, C/group_size], ..., cos/sin [B, T, D] or None.

    Returns (out [B, H, T, D], hat [B, T, C]) in `compute_dtype` (float64: the truth; float32: a
    same-precision baseline for error budgets). head_dim D is cos.shape[-1] when rotating.
    """
    r = higgs_dequantize(codes, scales, grid, signs, group_size, dtype=compute_dtype, compute_dtype=compute_dtype)
    hat = aqua_prediction(inputs, weights, up, bias, compute_dtype) + r
    b, t, c = hat.shape
    heads = hat.reshape(b, t, c // head_dim, head_dim).transpose(0, 2, 1, 3)  # [B, H, T, D]
    if cos is not None:
        cos = np.asarray(cos, compute_dtype)[:, None]
        sin = np.asarray(sin, compute_dtype)[:, None]
        heads = rope(heads, cos, sin)
    return heads, hat
