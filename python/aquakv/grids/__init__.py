"""MSE-optimal grids for the standard Gaussian, shipped as package data (docs/method.md).

Importing this module loads neither numpy nor torch: listing the grids is cheap (the command line's --help
uses it); `get_grid` loads them.

``get_grid(dim, n)`` returns the grid of n points in dim dimensions that HIGGS rounds to after the
random Hadamard transform. The files live in ``aquakv/grids/data``: ``d{dim}_n{n}.npy`` (float32
[n, dim], rows in lexicographic order) and ``grids.json`` (measured MSE per value, sample counts and
seeds). They are produced by ``python tools/grid_generate.py --out python/aquakv/grids/data`` (the rebuild tooling
lives outside the runtime package, in tools/).
"""
from __future__ import annotations

import functools
import json
import math
import re
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["available_grids", "bits_per_value_choices", "get_grid", "grid_info"]

_NAME = re.compile(r"d(\d+)_n(\d+)\.npy")


def _data_dir() -> resources.abc.Traversable:
    return resources.files(__name__).joinpath("data")


@functools.lru_cache(maxsize=1)
def _available() -> tuple[tuple[int, int], ...]:
    found = []
    for entry in _data_dir().iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append((int(match[1]), int(match[2])))
    return tuple(sorted(found))


def available_grids() -> list[tuple[int, int]]:
    """The shipped (dim, n) pairs, sorted."""
    return list(_available())


def bits_per_value_choices(dim: int | None = None) -> list[float]:
    """Bits per value, log2(n) / dim, of the shipped grids (of `dim` dimensions only, when given), sorted."""
    return sorted({math.log2(n) / d for d, n in _available() if dim in (None, d) and n > 1})


def _check(dim: int, n: int) -> None:
    if (dim, n) not in _available():
        raise ValueError(f"get_grid: no shipped grid with dim={dim}, n={n}; available (dim, n): {available_grids()}")


@functools.lru_cache(maxsize=None)
def _load(dim: int, n: int) -> "torch.Tensor":
    import numpy as np
    import torch

    with _data_dir().joinpath(f"d{dim}_n{n}.npy").open("rb") as f:
        arr = np.load(f, allow_pickle=False)
    if arr.shape != (n, dim) or arr.dtype != np.float32:
        raise RuntimeError(f"get_grid: data file d{dim}_n{n}.npy is corrupt: shape {arr.shape}, dtype {arr.dtype}")
    return torch.from_numpy(arr)


def get_grid(dim: int, n: int) -> "torch.Tensor":
    """The shipped MSE-optimal grid for N(0, I_dim) with n points.

    Returns a fresh float32 CPU tensor [n, dim] (a copy of the cached one, so callers may modify or
    move it freely). Raises ValueError naming the available pairs when (dim, n) is not shipped.
    """
    _check(dim, n)
    return _load(dim, n).clone()


def grid_info(dim: int, n: int) -> dict:
    """Metadata of a shipped grid from grids.json: measured ``mse`` per value, ``mse_stderr``, seeds, method."""
    _check(dim, n)
    index = json.loads(_data_dir().joinpath("grids.json").read_text())
    return index[f"d{dim}_n{n}"]
