"""higgs_linear's CUDA kernels (csrc/include/aquakv/higgs_linear.cuh), run on the host emulator, vs NumPy.

The emulator (tests/cuda_emulation/, built as in test_cuda_emulated.py) runs the rotate and gemv bodies with
their barriers, shuffles and shared memory; the grid is capped at 3 blocks so every grid-stride loop runs
several tiles per block. Tolerance: the float32 bound of tests/test_ops_higgs_linear.py (docs/ops.md), which
holds for any summation order of the in code-domain products and any rotation order of depth log2(G): the
kernel's order (per-lane partial sums over i = lane, lane + 32, ..., scaled per group, then a 5-level shuffle
tree; fused multiply-adds on a GPU only remove roundings) is one of them. Plus one rounding to x's dtype.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cuda_emulated import DTYPE_ARG, emulator, from_raw, raw, run  # noqa: F401 (emulator is a fixture)
from test_ops_higgs_linear import check_against_reference, make_case

from sweeps import valid_group_sizes


def emu_linear(emulator: Path, tmp: Path, x, codes, scales, grid, signs, group_size: int, bias,
               max_blocks: int = 3) -> torch.Tensor:
    batch_shape, in_features = x.shape[:-1], x.shape[-1]
    batch, out = int(np.prod(batch_shape, dtype=np.int64)), codes.shape[0]
    files = {name: tmp / f"{name}.bin" for name in ("x", "codes", "scales", "grid", "signs", "bias", "y")}
    raw(x).tofile(files["x"])
    codes.numpy().tofile(files["codes"])
    scales.numpy().tofile(files["scales"])
    grid.numpy().tofile(files["grid"])
    signs.numpy().tofile(files["signs"])
    if bias is not None:
        raw(bias).tofile(files["bias"])
    n, d = grid.shape
    run(emulator, tmp, "linear", DTYPE_ARG[x.dtype], batch, out, in_features, group_size.bit_length() - 1, n, d,
        files["x"], files["codes"], files["scales"], files["grid"], files["signs"],
        files["bias"] if bias is not None else "-", files["y"], max_blocks)
    return from_raw(files["y"], x.dtype, (*batch_shape, out))


def emulation_cases(count: int, seed: int = 0) -> list[tuple]:
    """d in {1, 2, 4} with several n each, random G, out and groups, batches on both sides of every batch tile
    (1, 2, 4, 8 rows per warp), every float dtype, with and without bias; kept small (fibers are slow)."""
    rng = np.random.default_rng(seed)
    grids = [(1, 2), (1, 16), (1, 256), (2, 4), (2, 16), (2, 64), (2, 256), (4, 16), (4, 256)]
    batches = [(1,), (2,), (3,), (5,), (2, 4), (9,), (17,)]
    out = []
    for i in range(count):
        d, n = grids[i % len(grids)]
        group_size = int(rng.choice(valid_group_sizes(d, n, lo=2 * d, hi=256)))
        groups = int(rng.integers(1, max(2, 512 // group_size) + 1))
        dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        out.append((d, n, int(rng.integers(1, 40)), groups, group_size, batches[i % len(batches)], dtype,
                    300 + i, bool(i % 2)))
    # A 2^16-point grid (too big for shared memory: read from device memory) and one group of 8192 values (the
    # rotation's tile is one group, larger than the default 4096).
    out.append((1, 65536, 5, 2, 16, (3,), torch.float32, 900, True))
    out.append((2, 16, 3, 1, 8192, (2,), torch.bfloat16, 901, False))
    return out


CASES = emulation_cases(27)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}n{c[1]}-o{c[2]}g{c[3]}G{c[4]}-b{c[5]}-{c[6]}".replace(
    "torch.", ""))
def test_emulated_higgs_linear_matches_reference(emulator: Path, tmp_path: Path, case) -> None:
    x, codes, scales, grid, signs, bias = make_case(*case)
    y = emu_linear(emulator, tmp_path, x, codes, scales, grid, signs, case[4], bias)
    used = check_against_reference(y, x, codes, scales, grid, signs, case[4], bias)
    print(f"{case}: {used:.3f} of the bound")


def test_emulated_higgs_linear_grid_stride_does_not_change_results(emulator: Path, tmp_path: Path) -> None:
    # One block looping over every tile vs many blocks: the same float operations per output, bitwise.
    x, codes, scales, grid, signs, bias = make_case(2, 256, 21, 3, 64, (9,), torch.float32, 7, True)
    one = emu_linear(emulator, tmp_path, x, codes, scales, grid, signs, 64, bias, max_blocks=1)
    many = emu_linear(emulator, tmp_path, x, codes, scales, grid, signs, 64, bias, max_blocks=1000)
    assert torch.equal(one, many)


def test_emulated_higgs_linear_notices_a_wrong_code(emulator: Path, tmp_path: Path) -> None:
    # The bound is tight enough that one flipped code in one row fails it (the check can fail).
    x, codes, scales, grid, signs, bias = make_case(2, 16, 4, 2, 32, (3,), torch.float32, 11, False)
    bad = codes.clone()
    bad[1, 0] ^= 0x0F
    y = emu_linear(emulator, tmp_path, x, bad, scales, grid, signs, 32, bias)
    with pytest.raises(AssertionError):
        check_against_reference(y, x, codes, scales, grid, signs, 32, bias)
