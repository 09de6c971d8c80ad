"""Reproducible generation of MSE-optimal grids for the standard Gaussian N(0, I_d) (docs/method.md).

- d = 1: exact Lloyd-Max. The centroid and boundary conditions are iterated with the Gaussian pdf/cdf
  in closed form, so no sampling is involved and the result is deterministic to float64 rounding.
- d >= 2: over-relaxed Lloyd (k-means) on many Gaussian samples. Samples are scrambled Sobol points
  pushed through the inverse normal cdf (quasi-Monte Carlo: a lower-variance estimate of the Gaussian
  integral than i.i.d. draws of the same count). Several starts are run (k-means++, and in 2-D a
  sunflower spiral), the best on common fresh samples is kept, then polished on a 4x larger set.

Everything is seeded; the same seed, torch version and thread count give the same grids.

Command line::

    python tools/grid_generate.py --out python/aquakv/grids/data            # every standard grid
    python tools/grid_generate.py --out /tmp/grids --only 2,16 --only 4,256

Each grid is written as ``d{dim}_n{n}.npy`` (float32 [n, dim], rows in lexicographic order) and its
measured MSE per value, sample count and seed are merged into ``grids.json`` in the same folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from grid_measure import squared_errors
from grid_search import KMeansSettings, kmeans_gaussian, lloyd_max_1d


@dataclass(frozen=True)
class GridJob:
    """One grid to generate: n points in dim dimensions, and the search effort for dim >= 2."""

    dim: int
    n: int
    settings: KMeansSettings = KMeansSettings()


# The grids shipped as package data, with the effort each one gets.
STANDARD_GRIDS: tuple[GridJob, ...] = (
    GridJob(1, 2),
    GridJob(1, 4),
    GridJob(1, 8),
    GridJob(1, 16),
    GridJob(1, 256),
    GridJob(2, 4),
    GridJob(2, 16),
    GridJob(2, 64),
    GridJob(2, 256, KMeansSettings(restarts=2)),
    GridJob(4, 16),
    GridJob(4, 256, KMeansSettings(restarts=2, polish_iters=150)),
)


def sort_rows(grid: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order (first coordinate most significant): a deterministic layout."""
    arr = grid.numpy()
    order = np.lexsort(arr.T[::-1])
    return grid[torch.from_numpy(order)]


def generate_grid(spec: GridJob, *, seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Generate one grid. Returns (float32 [n, dim] sorted, metadata dict for grids.json)."""
    start = time.perf_counter()
    if spec.dim == 1:
        grid64, exact = lloyd_max_1d(spec.n)
        grid = grid64.float()
        meta = {"method": "lloyd-max (exact, closed form)", "mse_exact": exact}
    else:
        grid, _ = kmeans_gaussian(spec.dim, spec.n, seed=seed, settings=spec.settings, progress=progress)
        grid = sort_rows(grid)
        meta = {"method": "over-relaxed lloyd on scrambled-Sobol gaussian samples, restarts, polish",
                "settings": asdict(spec.settings)}
    eval_samples, eval_seed = 1 << 22, 2024
    errs = squared_errors(grid, samples=eval_samples, seed=eval_seed)
    meta.update({
        "dim": spec.dim, "n": spec.n, "seed": seed,
        "mse": float(errs.mean()), "mse_stderr": float(errs.std() / math.sqrt(eval_samples)),
        "eval_samples": eval_samples, "eval_seed": eval_seed,
        "seconds": round(time.perf_counter() - start, 1),
    })
    return grid, meta


def _parse_only(text: str) -> tuple[int, int]:
    try:
        dim, n = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--only expects 'd,n' such as 2,16, got {text!r}") from None
    return dim, n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools/grid_generate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for d{dim}_n{n}.npy and grids.json")
    parser.add_argument("--only", type=_parse_only, action="append", metavar="D,N",
                        help="generate only this grid (repeatable); default: every standard grid")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0: the shipped grids)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (results depend on it slightly)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each restart's MSE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    known = {(s.dim, s.n): s for s in STANDARD_GRIDS}
    wanted = args.only or list(known)
    specs = [known.get(key, GridJob(*key)) for key in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "grids.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for spec in tqdm(specs, desc="grids"):
        grid, meta = generate_grid(spec, seed=args.seed, progress=True)
        name = f"d{spec.dim}_n{spec.n}"
        np.save(args.out / f"{name}.npy", grid.numpy().astype(np.float32))
        index[name] = meta
        index_path.write_text(json.dumps(dict(sorted(index.items())), indent=1) + "\n")
        tqdm.write(f"{name}: MSE per value {meta['mse']:.6f} +- {meta['mse_stderr']:.6f} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
