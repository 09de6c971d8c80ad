"""Walsh-Hadamard transform and the random sign diagonal (reference)."""
from __future__ import annotations

import numpy as np


def random_signs(n: int, seed: int) -> np.ndarray:
    """The diagonal D of the random Hadamard transform: float32 [n] of +-1 drawn from `seed`.

    Other code (aquakv.quantizer, saved artifacts) relies on exactly this definition.
    """
    return (1.0 - 2.0 * np.random.default_rng(seed).integers(0, 2, size=n)).astype(np.float32)


def hadamard_matrix(n: int) -> np.ndarray:
    """The unnormalised +-1 Hadamard matrix [n, n] in Sylvester order: H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n = {n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard(
    x: np.ndarray, signs: np.ndarray | None = None, scale: float = 1.0, compute_dtype: type = np.float64
) -> np.ndarray:
    """y = scale * H (signs * x) over the last dim, H the unnormalised Sylvester Hadamard matrix.

    x: [..., n], n a power of two; signs: [n] or None. Returns [..., n] in `compute_dtype`
    (float64 by default: the truth; float32 gives a same-precision baseline for error budgets).
    Computed with the butterfly, which equals multiplying by `hadamard_matrix(n)`.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: last dim {n} is not a power of two")
    y = np.asarray(x, dtype=compute_dtype).copy()
    if signs is not None:
        y = y * np.asarray(signs, dtype=compute_dtype)
    lead = y.shape[:-1]
    h = 1
    while h < n:
        # Pairs (y[j], y[j + h]) inside each block of 2h become (a + b, a - b).
        blocks = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = blocks[..., 0, :], blocks[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return (y * compute_dtype(scale)).astype(compute_dtype)
