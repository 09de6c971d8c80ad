"""Mean squared error of a grid on standard Gaussian samples (how every shipped grid is judged).

Offline tooling that rebuilds python/aquakv/grids/data (tools/grid_generate.py); not part of the runtime package."""
from __future__ import annotations

import torch

# Rows assigned per distance-matrix block: bounds the [rows, n] score matrix to ~64 MiB at n = 256.
CHUNK_ELEMS = 1 << 24


def nearest(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid point of each row.

    x: [N, d], grid: [n, d] (same dtype). Returns (codes int64 [N], squared error float64 [N]).
    The argmin uses ||g||^2 - 2<x, g> (a matmul); the error is recomputed exactly from x - g[code].
    """
    n = grid.shape[0]
    norms = (grid * grid).sum(1)
    rows = max(1, CHUNK_ELEMS // n)
    codes = torch.empty(x.shape[0], dtype=torch.long)
    err = torch.empty(x.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[0], rows):
        xc = x[s : s + rows]
        idx = torch.addmm(norms, xc, grid.T, alpha=-2.0).argmin(1)
        codes[s : s + rows] = idx
        err[s : s + rows] = (xc - grid[idx]).double().pow(2).sum(1)
    return codes, err


def gaussian_samples(count: int, dim: int, seed: int) -> torch.Tensor:
    """[count, dim] float32 i.i.d. N(0, 1) draws from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, dim, generator=gen, dtype=torch.float32)


def squared_errors(grid: torch.Tensor, *, samples: int = 1 << 20, seed: int = 1234) -> torch.Tensor:
    """Per-sample squared error ||x - q(x)||^2 / d of nearest-point quantization, x ~ N(0, I_d).

    grid: [n, d]. Returns float64 [samples]; its mean is the MSE per value and its standard deviation
    over sqrt(samples) the standard error of that estimate (the samples are i.i.d.).
    """
    grid = torch.as_tensor(grid, dtype=torch.float32)
    if grid.dim() != 2:
        raise ValueError(f"squared_errors: grid must be [n, d], got shape {tuple(grid.shape)}")
    x = gaussian_samples(samples, grid.shape[1], seed)
    return nearest(x, grid)[1] / grid.shape[1]


def grid_mse(grid: torch.Tensor, *, samples: int = 1 << 20, seed: int = 1234) -> float:
    """MSE per value of nearest-point quantization of fresh i.i.d. N(0, I_d) samples. grid: [n, d]."""
    return float(squared_errors(grid, samples=samples, seed=seed).mean())


