"""Compiled kernels vs the NumPy reference, over seeded sweeps (rules: tests/sweeps.py).

Parametrised over `sweeps.devices()`, so the same tests run on CUDA where those kernels exist.
"""
from __future__ import annotations

import aquakv.ops as ops
import numpy as np
import pytest
import torch
from aquakv import reference as ref
from sweeps import (
    FLOAT_DTYPES,
    HiggsCase,
    check_close,
    check_codes,
    check_scales,
    devices,
    higgs_cases,
    random_grid,
    random_values,
    to_f64,
)

DEVICES = devices()
HIGGS_CASES = higgs_cases(36, seed=0)


# ---- hadamard ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("log_n", range(1, 16))
def test_hadamard_matches_reference(device: str, dtype: torch.dtype, log_n: int) -> None:
    n = 2**log_n
    rows = max(1, 4096 // n) | 1  # odd row counts; ~4k values per case
    x = random_values((rows, n), dtype, seed=log_n)
    signs = torch.from_numpy(ref.random_signs(n, seed=log_n)) if log_n % 2 else None
    scale = n**-0.5
    got = ops.hadamard(x.to(device), None if signs is None else signs.to(device), scale)
    assert got.dtype == dtype and got.shape == x.shape
    s = None if signs is None else signs.numpy()
    want64 = ref.hadamard(to_f64(x), s, scale)
    want32 = ref.hadamard(to_f64(x), s, scale, compute_dtype=np.float32)
    check_close(got, want64, want32, f"hadamard n={n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 64, 4096])
def test_hadamard_orthonormal_is_its_own_inverse(device: str, n: int) -> None:
    x = random_values((5, n), torch.float32, seed=n).to(device)
    y = ops.hadamard(ops.hadamard(x, None, n**-0.5), None, n**-0.5)
    # Two float32 butterflies of depth log2(n): a few eps relative to the row norm.
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5 * float(x.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_leading_dims_and_noncontiguous(device: str) -> None:
    x = random_values((3, 64, 5), torch.float32, seed=3).to(device).transpose(1, 2)  # [3, 5, 64], strided
    assert not x.is_contiguous()
    got = ops.hadamard(x, None, 0.125)
    assert got.shape == (3, 5, 64)
    torch.testing.assert_close(got, ops.hadamard(x.contiguous(), None, 0.125), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("scale", [1.0, 2.0**-10, 3.0])
def test_half_conversions_are_exact(device: str, dtype: torch.dtype, scale: float) -> None:
    # Every 16-bit pattern (normals, subnormals, +-0, +-inf, NaN) against a random partner: n = 2 gives
    # (a + b, a - b) * scale in float32, the same float32 operations torch does, so the rounding back to
    # fp16/bf16 (nearest even, overflow to inf, subnormals) must agree bit for bit. Scale 2^-10 pushes
    # results into subnormals; 3.0 makes them overflow and round inexactly.
    a = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    b = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))]
    got = ops.hadamard(torch.stack([a, b], -1).to(device), None, scale).cpu()
    want = (torch.stack([a.float() + b.float(), a.float() - b.float()], -1) * scale).to(dtype)
    both_nan = got.isnan() & want.isnan()
    assert torch.equal(got.view(torch.int16)[~both_nan], want.view(torch.int16)[~both_nan])
    assert torch.equal(got.isnan(), want.isnan())


# ---- higgs quantize / dequantize --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", HIGGS_CASES, ids=str)
def test_quantize_codes_match_reference_except_ties(device: str, case: HiggsCase) -> None:
    x, grid, signs = case.inputs()
    codes, scales = ops.higgs_quantize(x.to(device), grid.to(device), signs.to(device), case.group_size)
    assert codes.dtype == torch.uint8 and codes.shape == (*case.lead, case.channels // case.d * case.code_bits // 8)
    assert scales.shape == (*case.lead, case.channels // case.group_size)
    ties = check_codes(codes, x, grid, signs, case.group_size)
    # Random grids put some points close together, which makes near-ties common for n = 256, d = 1
    # (seen: up to 0.09% of codes, each within 6e-7 of the best distance); 1% would mean a systematic error.
    sub_vectors = x.numel() // case.d
    assert ties <= max(2, sub_vectors // 100), f"{ties} of {sub_vectors} codes are near-tie mismatches"
    check_scales(scales, x, case.group_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", HIGGS_CASES[::2], ids=str)
def test_dequantize_matches_reference(device: str, case: HiggsCase) -> None:
    x, grid, signs = case.inputs()
    codes, scales = ref.higgs_quantize(to_f64(x), grid.numpy(), signs.numpy(), case.group_size)
    got = ops.higgs_dequantize(
        torch.from_numpy(codes).to(device),
        torch.from_numpy(scales).to(device),
        grid.to(device),
        signs.to(device),
        case.group_size,
        case.dtype,
    )
    assert got.dtype == case.dtype and got.shape == x.shape
    args = (codes, scales, grid.numpy(), signs.numpy(), case.group_size)
    want64 = ref.higgs_dequantize(*args, dtype=np.float64)
    want32 = ref.higgs_dequantize(*args, dtype=np.float32, compute_dtype=np.float32)
    check_close(got, want64, want32, f"higgs_dequantize {case}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d,n,group_size", [(8, 256, 64), (16, 65536, 64), (1, 65536, 16)])
def test_wide_grids_and_16_bit_codes(device: str, d: int, n: int, group_size: int) -> None:
    # d = 8 and 16 take the generic (runtime d) search loop; n = 65536 exercises 16-bit codes.
    case = HiggsCase((3,), 2 * group_size, group_size, d, n, torch.float32, seed=d)
    x, grid, signs = case.inputs()
    codes, scales = ops.higgs_quantize(x.to(device), grid.to(device), signs.to(device), group_size)
    check_codes(codes, x, grid, signs, group_size)
    check_scales(scales, x, group_size)
    back = ops.higgs_dequantize(codes, scales, grid.to(device), signs.to(device), group_size, torch.float32)
    want = ref.higgs_dequantize(codes.cpu().numpy(), scales.cpu().numpy(), grid.numpy(), signs.numpy(), group_size)
    torch.testing.assert_close(back.cpu(), torch.from_numpy(want), rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


LLOYD_MAX_2BIT = [-1.5104, -0.4528, 0.4528, 1.5104]  # optimal 4-level scalar quantizer for N(0, 1), MSE 0.1175


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda t: str(t)[6:])
def test_round_trip_error_is_the_grid_error(device: str, dtype: torch.dtype) -> None:
    # After the random Hadamard rotation y ~ N(0, 1) entrywise, so relative MSE of the round trip must be
    # the grid's MSE on N(0, 1): 0.1175 for Lloyd-Max 2 bits. Over 64k values the sampling spread is
    # ~1%; the band [0.112, 0.123] is +-5%, loose enough for that and for fp16/bf16 input rounding, and tight
    # enough to catch a wrong scale (sqrt(2) off doubles the error) or a wrong rotation.
    x = torch.randn((128, 512), generator=torch.Generator().manual_seed(0)).to(dtype)
    grid = torch.tensor(LLOYD_MAX_2BIT).reshape(4, 1)
    signs = torch.from_numpy(ref.random_signs(128, seed=0))
    codes, scales = ops.higgs_quantize(x.to(device), grid.to(device), signs.to(device), 128)
    x_hat = ops.higgs_dequantize(codes, scales, grid.to(device), signs.to(device), 128, torch.float32).cpu()
    rel_mse = float(((x_hat - x.float()) ** 2).sum() / (x.float() ** 2).sum())
    assert 0.112 < rel_mse < 0.123, rel_mse


@pytest.mark.parametrize("device", DEVICES)
def test_zero_groups_give_zero_scale_and_zero_output(device: str) -> None:
    x = random_values((4, 256), torch.float32, seed=1)
    x[1] = 0.0
    x[2, 128:] = 0.0
    grid = random_grid(16, 2, seed=2)
    signs = torch.from_numpy(ref.random_signs(128, seed=3))
    codes, scales = ops.higgs_quantize(x.to(device), grid.to(device), signs.to(device), 128)
    check_codes(codes, x, grid, signs, 128)  # y = 0: every code is the grid point nearest the origin
    assert (scales[1] == 0).all() and scales[2, 1] == 0 and (scales[0] > 0).all()
    back = ops.higgs_dequantize(codes, scales, grid.to(device), signs.to(device), 128, torch.float32).cpu()
    assert torch.isfinite(back).all()
    assert (back[1] == 0).all() and (back[2, 128:] == 0).all() and (back[0] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_exact_ties_go_to_the_lowest_index(device: str) -> None:
    # Every point appears twice (indices 2k and 2k+1): the nearest is always an exact tie.
    base = random_grid(32, 2, seed=4)
    grid = base.repeat_interleave(2, dim=0)
    x = random_values((9, 256), torch.float32, seed=5)
    signs = torch.from_numpy(ref.random_signs(64, seed=6))
    codes, _ = ops.higgs_quantize(x.to(device), grid.to(device), signs.to(device), 64)
    got = ops.unpack_bits(codes.cpu(), 6, 128)
    assert (got % 2 == 0).all(), "a duplicated grid point was coded by its higher index"
    check_codes(codes, x, grid, signs, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_results_do_not_depend_on_thread_count(device: str) -> None:
    case = HiggsCase((33,), 512, 64, 2, 256, torch.float16, seed=9)
    x, grid, signs = (t.to(device) for t in case.inputs())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.higgs_quantize(x, grid, signs, 64)
        torch.set_num_threads(max(2, threads))
        many = ops.higgs_quantize(x, grid, signs, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# ---- pack / unpack ----------------------------------------------------------------------------

BITS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
COUNTS = [1, 7, 8, 9, 99, 999]


def random_codes(shape: tuple[int, ...], bits: int, seed: int, junk_high_bits: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int32)
    if junk_high_bits:  # pack keeps only the low `bits` bits; the rest must not leak into neighbours
        codes = codes | (torch.randint(-(2**30), 2**30, shape, generator=gen, dtype=torch.int32) << bits)
    return codes


@pytest.mark.parametrize("device", devices("pack_bits"))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", COUNTS)
def test_pack_matches_reference_and_round_trips(device: str, bits: int, count: int) -> None:
    codes = random_codes((3, count), bits, seed=bits * 1000 + count, junk_high_bits=count % 2 == 1)
    packed = ops.pack_bits(codes.to(device), bits)
    want = ref.pack_bits(codes.numpy(), bits)
    assert packed.dtype == torch.uint8 and packed.shape == want.shape
    np.testing.assert_array_equal(packed.cpu().numpy(), want)  # bits are exact
    low = codes & (2**bits - 1)
    unpacked = ops.unpack_bits(packed, bits, count)
    assert unpacked.dtype == torch.int32
    np.testing.assert_array_equal(unpacked.cpu().numpy(), low.numpy())
    # Each implementation reads the other's output.
    np.testing.assert_array_equal(ref.unpack_bits(packed.cpu().numpy(), bits, count), low.numpy())
    np.testing.assert_array_equal(ops.unpack_bits(torch.from_numpy(want).to(device), bits, count).cpu(), low)


@pytest.mark.parametrize("device", devices("unpack_bits"))
@pytest.mark.parametrize("bits", [1, 3, 6, 16])
def test_unpack_reads_any_bytes(device: str, bits: int) -> None:
    # Arbitrary bytes (including set padding bits in the last byte) decode like the reference.
    count = 37
    packed = torch.randint(0, 256, (2, 5, (count * bits + 7) // 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(bits))
    got = ops.unpack_bits(packed.to(device), bits, count).cpu().numpy()
    np.testing.assert_array_equal(got, ref.unpack_bits(packed.numpy(), bits, count))
