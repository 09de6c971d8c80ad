"""Searching for MSE-optimal grids of the standard Gaussian: exact Lloyd-Max in 1-D, over-relaxed Lloyd (k-means)
on quasi-Monte Carlo Gaussian samples for d >= 2 (see grid_generate.py for the protocol the shipped grids used)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from grid_measure import CHUNK_ELEMS, gaussian_samples, grid_mse, nearest

logger = logging.getLogger(__name__)

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class KMeansSettings:
    """Effort of the sample-based search for d >= 2 (defaults are the ones the shipped grids used).

    samples: training points per restart; restarts: independent starts (in 2-D the first is a
    sunflower spiral, the others k-means++); iters: Lloyd iterations per restart; polish_samples /
    polish_iters: final Lloyd on a larger set for the best restart; eval_samples: fresh i.i.d. points
    used to choose between restarts and to report the MSE.
    """

    samples: int = 1 << 19
    restarts: int = 4
    iters: int = 400
    polish_samples: int = 1 << 21
    polish_iters: int = 100
    eval_samples: int = 1 << 20


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _upper_tail(x: torch.Tensor) -> torch.Tensor:
    """P(X > x), accurate in the upper tail (no 1 - cdf cancellation)."""
    return 0.5 * torch.special.erfc(x / _SQRT2)


def lloyd_max_1d(n: int, *, tol: float = 1e-13, max_iter: int = 200_000) -> tuple[torch.Tensor, float]:
    """Exact Lloyd-Max quantizer of N(0, 1) with n levels (n even).

    The optimal quantizer is symmetric, so only the n/2 positive levels are iterated: boundaries are
    midpoints of neighbouring levels (b_0 = 0, b_{n/2} = inf) and each level moves to the conditional
    mean of its cell, E[X | a < X < b] = (phi(a) - phi(b)) / (Q(a) - Q(b)), Q the upper tail.

    Returns (levels float64 [n, 1] ascending, MSE per value computed in closed form).
    """
    if n < 2 or n % 2:
        raise ValueError(f"lloyd_max_1d: n must be an even number >= 2, got {n}")
    half = n // 2
    # Start from the uniform-probability quantiles of the half-normal: already close to optimal.
    u = (torch.arange(half, dtype=torch.float64) + 0.5) / half
    levels = _SQRT2 * torch.special.erfinv(u)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    for _ in range(max_iter):
        edges = torch.cat([zero, 0.5 * (levels[1:] + levels[:-1]), inf])
        a, b = edges[:-1], edges[1:]
        mass = _upper_tail(a) - _upper_tail(b)
        new = (_phi(a) - _phi(b)) / mass
        step = (new - levels).abs().max().item()
        levels = new
        if step < tol:
            break
    else:
        logger.warning("lloyd_max_1d(n=%d) stopped after %d iterations without reaching tol", n, max_iter)
    # E[X^2] = 1 and the levels are conditional means, so MSE = 1 - sum_i P_i c_i^2 (both halves).
    edges = torch.cat([zero, 0.5 * (levels[1:] + levels[:-1]), inf])
    mass = _upper_tail(edges[:-1]) - _upper_tail(edges[1:])
    mse = 1.0 - 2.0 * float((mass * levels * levels).sum())
    grid = torch.cat([-levels.flip(0), levels]).unsqueeze(1)
    return grid, mse


# --------------------------------------------------------------------------------------------
# Nearest-point assignment and MSE
# --------------------------------------------------------------------------------------------
def gaussian_qmc(count: int, dim: int, seed: int) -> torch.Tensor:
    """count scrambled-Sobol points mapped to N(0, I_dim) by the inverse normal cdf. float32 [count, dim]."""
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(count, dtype=torch.float64)
    u = u.clamp(1e-12, 1.0 - 1e-12)
    return (_SQRT2 * torch.special.erfinv(2.0 * u - 1.0)).float()


def _kmeans_pp(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) from the rows of x [N, d]; returns [n, d]."""
    centers = torch.empty(n, x.shape[1], dtype=x.dtype)
    centers[0] = x[torch.randint(x.shape[0], (1,), generator=gen)]
    d2 = (x - centers[0]).pow(2).sum(1)
    for k in range(1, n):
        pick = torch.multinomial(d2, 1, generator=gen)
        centers[k] = x[pick]
        d2 = torch.minimum(d2, (x - centers[k]).pow(2).sum(1))
    return centers


def _sunflower(n: int) -> torch.Tensor:
    """n points of a sunflower (golden-angle) spiral shaped to N(0, 2 I_2). float32 [n, 2].

    High-resolution theory puts the optimal point density of a 2-D quantizer at p^(1/2), for N(0, I)
    the density of N(0, 2 I); the spiral's radii follow that distribution's quantiles (Rayleigh with
    sigma^2 = 2). Its neighbourhoods are nearly hexagonal, so Lloyd starts without the lattice defects
    that trap it when started from random points (worth ~0.5% MSE at n = 256).
    """
    k = torch.arange(n, dtype=torch.float64)
    radius = torch.sqrt(-4.0 * torch.log1p(-(k + 0.5) / n))
    angle = k * math.pi * (3.0 - math.sqrt(5.0))
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1).float()


def _nearest_two(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest grid point of each row plus a lower bound on the distance to the second nearest.

    x: [N, d], grid: [n, d]. Returns (codes int64 [N], squared error float32 [N], second-nearest
    distance lower bound float32 [N]). The bound subtracts a slack covering the float32 rounding of
    the ||x||^2 - 2<x, g> + ||g||^2 expansion, so it is a true lower bound.
    """
    n = grid.shape[0]
    norms = (grid * grid).sum(1)
    rows = max(1, CHUNK_ELEMS // n)
    codes = torch.empty(x.shape[0], dtype=torch.long)
    second = torch.empty(x.shape[0], dtype=torch.float32)
    for s in range(0, x.shape[0], rows):
        xc = x[s : s + rows]
        vals, idx = torch.addmm(norms, xc, grid.T, alpha=-2.0).topk(2, dim=1, largest=False)
        x2 = (xc * xc).sum(1)
        codes[s : s + rows] = idx[:, 0]
        second[s : s + rows] = (vals[:, 1] + x2 - 1e-5 * (1.0 + x2 + norms.max())).clamp_min(0).sqrt()
    err = (x - grid[codes]).pow(2).sum(1)
    return codes, err, second


def lloyd(x: torch.Tensor, grid: torch.Tensor, iters: int, *, tol: float = 1e-7, max_relax: float = 1.8,
          desc: str | None = None) -> torch.Tensor:
    """Over-relaxed Lloyd iterations on samples x [N, d] from grid [n, d]; returns the improved float32 grid.

    Plain Lloyd moves each point to its cell's centroid c; with many cells it then crawls along flat
    valleys for hundreds of iterations. Each step here moves to g + beta (c - g), beta growing from 1 to
    max_relax while the training MSE keeps falling; a step that raises it is undone (back to the last
    accepted centroids, beta = 1), so the training MSE never increases. An empty cell is re-seeded at
    the sample with the largest error. Stops when one accepted step improves the MSE by less than tol
    (relative); returns the centroids of the last accepted step.

    Assignments are exact but mostly skipped (Hamerly's bound): each sample keeps a lower bound on its
    distance to every other point, lowered by the largest point move of each step; only samples whose
    current distance exceeds it are re-assigned against the whole grid.
    """
    n, d = grid.shape
    xd = x.double()
    grid = grid.clone()
    codes, err, lower = _nearest_two(x, grid)
    centroids, prev, beta = grid, math.inf, 1.0
    for _ in tqdm(range(iters), desc=desc, leave=False, disable=desc is None):
        stale = torch.nonzero(err.sqrt() > lower).flatten()
        if len(stale):
            codes[stale], err[stale], lower[stale] = _nearest_two(x[stale], grid)
        mse = float(err.double().mean())
        if mse > prev:
            step, beta = centroids, 1.0
        else:
            counts = torch.bincount(codes, minlength=n)
            filled = counts > 0
            sums = torch.zeros(n, d, dtype=torch.float64).index_add_(0, codes, xd)
            new = grid.clone()
            new[filled] = (sums[filled] / counts[filled, None]).float()
            empty = torch.nonzero(~filled).flatten()
            if len(empty):
                new[empty] = x[err.topk(len(empty)).indices]
                beta = 1.0
            converged = prev - mse < tol * mse and len(empty) == 0
            centroids, prev = new, mse
            if converged:
                break
            step = grid + beta * (new - grid)
            beta = min(beta + 0.1, max_relax)
        lower -= (step - grid).norm(dim=1).max()
        grid = step
        err = (x - grid[codes]).pow(2).sum(1)
    return centroids


def kmeans_gaussian(dim: int, n: int, *, seed: int = 0, settings: KMeansSettings = KMeansSettings(),
                    progress: bool = False) -> tuple[torch.Tensor, float]:
    """MSE-optimised grid of n points for N(0, I_dim) by restarted, polished Lloyd.

    Returns (grid float32 [n, dim] unsorted, MSE per value on settings.eval_samples fresh samples).
    """
    s = settings
    gen = torch.Generator().manual_seed(seed)
    # One fresh i.i.d. set (a seed stream distinct from every training stream) judges all restarts:
    # common samples make the comparison sharper than the restarts' MSE differences.
    judge = gaussian_samples(s.eval_samples, dim, seed * 1000 + 500)
    best, best_mse = None, math.inf
    for r in range(s.restarts):
        x = gaussian_qmc(s.samples, dim, seed=seed * 1000 + r)
        init = _sunflower(n) if dim == 2 and r == 0 else _kmeans_pp(x[: min(s.samples, 64 * n)], n, gen)
        grid = lloyd(x, init, s.iters, desc=f"d{dim} n{n} restart {r}" if progress else None)
        mse = float(nearest(judge, grid)[1].mean()) / dim
        logger.info("d=%d n=%d restart %d: MSE %.6f", dim, n, r, mse)
        if mse < best_mse:
            best, best_mse = grid, mse
    assert best is not None
    if s.polish_iters > 0:
        x = gaussian_qmc(s.polish_samples, dim, seed=seed * 1000 + 999)
        best = lloyd(x, best, s.polish_iters, tol=1e-8, desc=f"d{dim} n{n} polish" if progress else None)
    return best, grid_mse(best, samples=s.eval_samples, seed=seed * 1000 + 777)


