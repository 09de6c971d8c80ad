"""higgs_linear's point loops for 16-, 64- and 256-point grids (4-, 6- and 8-bit codes, point-major):
csrc/cpu/higgs_linear_points_512.cpp on AVX-512, csrc/cpu/higgs_linear_points_256.cpp on AVX2.

They tile the rows of x by 16 (AVX-512 only), 8, 4, 2 and 1, cut the columns into blocks of 8192 / tile floats,
the output rows into tiles of 64, and handle groups of fewer than 16 floats with a masked tail. The sweep crosses
every one of those boundaries, with the bound of test_ops_higgs_linear (float32 accumulation in any order:
gamma_(in+2) of the absolute products, plus the rotation's and the output rounding's share). "avx512" on a CPU
without it runs the AVX2 loop; without AVX2 both run the general loops, which must meet the same bound.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sweeps import valid_group_sizes
from test_ops_higgs_linear import check_against_reference, make_case

import aquakv.ops as ops

BATCHES = (1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16)  # every mix of the 16/8/4/2/1 tiles up to the GEMV limit


def finite_case(case: tuple) -> tuple:
    """make_case, with any fp16 scale that overflowed (heavy-tailed weights, long groups) set to 1000: the loop's
    arithmetic is under test, not higgs_quantize's range."""
    x, codes, scales, grid, signs, bias = make_case(*case)
    scales = torch.where(torch.isfinite(scales), scales, torch.full_like(scales, 1000.0))
    return x, codes, scales, grid, signs, bias


def point_cases(count: int, seed: int = 22) -> list[tuple]:
    """Seeded (d, n, out, groups, G, batch, dtype, seed, bias) with n = 16, 64 or 256: the layers this loop serves."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        d, n = (1, 2, 4)[i % 3], (256, 64, 16)[i // 3 % 3]
        group_size = int(rng.choice(valid_group_sizes(d, n, lo=d, hi=1024)))
        groups = int(rng.integers(1, max(2, 4096 // group_size) + 1))  # up to in = 4096: several column blocks
        rows = int(rng.integers(1, 150))  # past one 64-row tile, odd counts
        batch = (BATCHES[i % len(BATCHES)],)
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        out.append((d, n, rows, groups, group_size, batch, dtype, 2200 + i, bool(i % 2)))
    return out


CASES = point_cases(54)


@pytest.mark.parametrize("isa", ("avx512", "avx2"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}n{c[1]}-o{c[2]}g{c[3]}G{c[4]}-b{c[5][0]}-{c[6]}".replace(
    "torch.", ""))
def test_256_point_grids_match_reference_within_the_float32_bound(case, isa, monkeypatch) -> None:
    monkeypatch.setenv("AQUAKV_HIGGS_LINEAR_ISA", isa)
    x, codes, scales, grid, signs, bias = finite_case(case)
    y = ops.higgs_linear(x, codes, scales, grid, signs, case[4], bias)
    used = check_against_reference(y, x, codes, scales, grid, signs, case[4], bias)
    print(f"{case}: {used:.3f} of the bound")


@pytest.mark.parametrize("d", (1, 2, 4))
def test_wide_rows_cross_the_single_row_block(d: int) -> None:
    # in = 12288 > 8192: a single row of x is cut into two column blocks too.
    x, codes, scales, grid, signs, bias = finite_case((d, 256, 7, 48, 256, (1,), torch.float32, 31 + d, True))
    y = ops.higgs_linear(x, codes, scales, grid, signs, 256, bias)
    check_against_reference(y, x, codes, scales, grid, signs, 256, bias)


def test_each_row_of_x_equals_its_own_batch_of_one() -> None:
    # The tiles must not mix rows of x: row b of a batch of 13 (tiles 8 + 4 + 1) is its batch-1 result, to the
    # float32 reordering between tile sizes (the same bound, checked on both).
    x, codes, scales, grid, signs, _ = finite_case((2, 256, 33, 16, 256, (13,), torch.float32, 41, False))
    y = ops.higgs_linear(x, codes, scales, grid, signs, 256)
    for b in (0, 7, 8, 11, 12):
        alone = ops.higgs_linear(x[b : b + 1], codes, scales, grid, signs, 256)
        torch.testing.assert_close(y[b : b + 1], alone, rtol=2e-5, atol=2e-5)
        check_against_reference(alone, x[b : b + 1], codes, scales, grid, signs, 256, None)
