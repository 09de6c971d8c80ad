"""CUDA kernels: what the shared sweeps do not already cover.

tests/test_ops_cpu.py and tests/test_ops_compile.py are parametrised over `sweeps.devices()`, so on a
machine with a GPU and a CUDA build they already run every reference sweep and opcheck on CUDA.
This file adds the CUDA-specific parts: the group sizes only the GPU splits across warps (up to
32768), agreement with the CPU kernel (bit for bit where the arithmetic is the same), inputs that
are misaligned views, side streams and graphs, a second device, and opcheck on the split paths.
Skipped without a GPU or without the CUDA kernels (a CPU-only build).
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
    has_kernel,
    higgs_cases,
    random_grid,
    random_values,
    to_f64,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not has_kernel("hadamard", "CUDA"), reason="aquakv was built without its CUDA kernels"),
]


def signs_for(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(ref.random_signs(n, seed))


# ---- hadamard ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("log_n", range(1, 16))
def test_hadamard_is_bitwise_the_cpu_kernel(dtype: torch.dtype, log_n: int) -> None:
    # Same float32 operations in the same order (butterflies bit by bit, ascending; x * sign is exact
    # for +-1, so a fused multiply-add cannot change it): identical bits, not merely close.
    n = 2**log_n
    x = random_values((max(3, 20000 // n) | 1, n), dtype, seed=log_n)
    signs = signs_for(n, log_n)
    got = ops.hadamard(x.cuda(), signs.cuda(), n**-0.5).cpu()
    assert torch.equal(got, ops.hadamard(x, signs, n**-0.5))


@pytest.mark.parametrize("log_n", [1, 2, 3, 6, 12])
def test_hadamard_of_misaligned_views(log_n: int) -> None:
    # x[1:] of a [rows, n] fp16 tensor starts 2n bytes in: not 16-byte aligned for n < 8.
    n = 2**log_n
    base = random_values((41, n), torch.float16, seed=log_n).cuda()
    view = base[1:]
    got = ops.hadamard(view, None, 1.0)
    assert torch.equal(got, ops.hadamard(view.contiguous().clone(), None, 1.0))
    want64 = ref.hadamard(to_f64(view), None, 1.0)
    check_close(got, want64, ref.hadamard(to_f64(view), None, 1.0, compute_dtype=np.float32), "misaligned hadamard")


def test_many_rows_and_empty_inputs() -> None:
    x = random_values((3, 70001, 64), torch.bfloat16, seed=7).cuda()  # ~14k blocks of 4096 values
    signs = signs_for(64, 7)
    got = ops.hadamard(x, signs.cuda(), 0.125)
    assert torch.equal(got.cpu(), ops.hadamard(x.cpu(), signs, 0.125))
    assert ops.hadamard(torch.empty((0, 64), device="cuda"), None, 1.0).shape == (0, 64)


# ---- higgs: sizes only CUDA splits across warps -------------------------------------------------

SPLIT_CASES = [
    HiggsCase((3,), 2048, 1024, 2, 16, torch.float32, seed=1),  # fp32 splits from 1024
    HiggsCase((5,), 4096, 2048, 2, 16, torch.float16, seed=2),  # fp16 from 2048
    HiggsCase((2,), 8192, 4096, 4, 256, torch.bfloat16, seed=3),
    HiggsCase((3,), 8192, 8192, 1, 16, torch.float16, seed=4),
    HiggsCase((2,), 32768, 16384, 2, 64, torch.float32, seed=5),
    HiggsCase((1,), 32768, 32768, 2, 16, torch.float16, seed=6),
    HiggsCase((1,), 32768, 32768, 8, 256, torch.float32, seed=7),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_split_group_quantize_and_dequantize_match_reference(case: HiggsCase) -> None:
    x, grid, signs = case.inputs()
    codes, scales = ops.higgs_quantize(x.cuda(), grid.cuda(), signs.cuda(), case.group_size)
    check_codes(codes, x, grid, signs, case.group_size)
    check_scales(scales, x, case.group_size)
    rc, rs = ref.higgs_quantize(to_f64(x), grid.numpy(), signs.numpy(), case.group_size)
    got = ops.higgs_dequantize(torch.from_numpy(rc).cuda(), torch.from_numpy(rs).cuda(), grid.cuda(), signs.cuda(),
                               case.group_size, case.dtype)
    args = (rc, rs, grid.numpy(), signs.numpy(), case.group_size)
    check_close(got, ref.higgs_dequantize(*args, dtype=np.float64),
                ref.higgs_dequantize(*args, dtype=np.float32, compute_dtype=np.float32), f"dequantize {case}")


# ---- higgs: agreement with the CPU kernel -----------------------------------------------------

AGREEMENT_CASES = higgs_cases(12, seed=7) + SPLIT_CASES[::2]


@pytest.mark.parametrize("case", AGREEMENT_CASES, ids=str)
def test_cuda_and_cpu_kernels_agree(case: HiggsCase) -> None:
    x, grid, signs = case.inputs()
    g = case.group_size
    cpu_codes, cpu_scales = ops.higgs_quantize(x, grid, signs, g)
    cuda_codes, cuda_scales = ops.higgs_quantize(x.cuda(), grid.cuda(), signs.cuda(), g)
    # Codes: both within the near-tie rule of the reference (they may pick different sides of a tie,
    # since the GPU sums squares in another order and fuses multiply-adds in the grid scores).
    check_codes(cuda_codes, x, grid, signs, g)
    differ = (ops.unpack_bits(cuda_codes.cpu(), case.code_bits, x.shape[-1] // case.d)
              != ops.unpack_bits(cpu_codes, case.code_bits, x.shape[-1] // case.d)).sum()
    assert int(differ) <= max(2, x.numel() // case.d // 100)
    # Scales: fp16 of float32 norms summed in different orders, so at most one fp16 ulp apart.
    ulp = np.spacing(np.abs(cpu_scales.numpy())).astype(np.float64)
    assert (np.abs(cuda_scales.cpu().double().numpy() - cpu_scales.double().numpy()) <= ulp).all()
    # Dequantize of the same codes: lookup, butterflies and scaling in the same order: bit for bit.
    cuda_back = ops.higgs_dequantize(cpu_codes.cuda(), cpu_scales.cuda(), grid.cuda(), signs.cuda(), g, case.dtype)
    assert torch.equal(cuda_back.cpu(), ops.higgs_dequantize(cpu_codes, cpu_scales, grid, signs, g, case.dtype))


def test_big_grid_from_device_memory() -> None:
    # 2^16 points in 8 dims do not fit in shared memory: half norms go through the workspace kernel.
    case = HiggsCase((3,), 1024, 512, 8, 65536, torch.float16, seed=8)
    x, grid, signs = case.inputs()
    codes, scales = ops.higgs_quantize(x.cuda(), grid.cuda(), signs.cuda(), 512)
    check_codes(codes, x, grid, signs, 512)
    check_scales(scales, x, 512)


def test_dequantize_of_misaligned_code_views() -> None:
    case = HiggsCase((9,), 192, 64, 2, 16, torch.float16, seed=9)
    x, grid, signs = case.inputs()
    codes, scales = ops.higgs_quantize(x.cuda(), grid.cuda(), signs.cuda(), 64)
    want = ops.higgs_dequantize(codes[1:].clone(), scales[1:].clone(), grid.cuda(), signs.cuda(), 64, torch.float16)
    got = ops.higgs_dequantize(codes[1:], scales[1:], grid.cuda(), signs.cuda(), 64, torch.float16)  # 48-byte offset
    assert torch.equal(got, want)


# ---- streams, graphs, devices ------------------------------------------------------------------


def test_ops_run_on_the_current_stream_and_in_graphs() -> None:
    x = random_values((257, 128), torch.float16, seed=10).cuda()
    grid = random_grid(16, 2, seed=11).cuda()
    signs = signs_for(128, 12).cuda()
    eager = ops.higgs_dequantize(*ops.higgs_quantize(x, grid, signs, 128), grid, signs, 128, torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = ops.higgs_dequantize(*ops.higgs_quantize(x, grid, signs, 128), grid, signs, 128, torch.float16)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, eager)
    # Capturable: a launch on the capturing stream with no host synchronisation inside.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.higgs_dequantize(*ops.higgs_quantize(x, grid, signs, 128), grid, signs, 128, torch.float16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_run_on_the_tensors_device() -> None:
    x = random_values((33, 256), torch.float32, seed=13)
    signs = signs_for(256, 14)
    with torch.cuda.device(0):
        got = ops.hadamard(x.to("cuda:1"), signs.to("cuda:1"), 1.0)
    assert got.device == torch.device("cuda:1")
    assert torch.equal(got.cpu(), ops.hadamard(x, signs, 1.0))


# ---- opcheck on the split paths ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda t: str(t)[6:])
def test_opcheck_split_group_sizes(dtype: torch.dtype) -> None:
    x = random_values((2, 4096), dtype, seed=15).cuda()
    grid = random_grid(16, 2, seed=16).cuda()
    signs = signs_for(4096, 17).cuda()
    torch.library.opcheck(torch.ops.aquakv.hadamard.default, (x, signs, 4096**-0.5))
    torch.library.opcheck(torch.ops.aquakv.higgs_quantize.default, (x, grid, signs, 4096))
    codes, scales = ops.higgs_quantize(x, grid, signs, 4096)
    torch.library.opcheck(torch.ops.aquakv.higgs_dequantize.default, (codes, scales, grid, signs, 4096, dtype))


# ---- aqua_reconstruct (the 60-case reference sweep of tests/test_ops_reconstruct.py runs on CUDA too) ----


def _recon_case(**changes):
    from test_ops_reconstruct import ReconCase

    base = dict(batch=2, tokens=5, heads=2, head_dim=64, group_size=64, d=2, n=16, in_widths=(), pred_groups=1,
                rank=None, rotated=True, dtype=torch.float16, out_layout="slice", hat_layout="strided", seed=3)
    return ReconCase(**(base | changes))


@pytest.mark.parametrize("group_size", [64, 8192], ids=["fused", "dequantize-first"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda t: str(t)[6:])
def test_reconstruct_without_matmul_is_bitwise_the_cpu_kernel(group_size: int, dtype: torch.dtype) -> None:
    # No inputs, so no cuBLAS: the epilogue's float32 operations are the CPU pass's, in the same order and
    # without fused multiply-adds (mul_rn / add_rn), on both GPU paths (a segment of lcm(D, G) = 8192
    # values does not fit the 4096-value tile and goes through higgs_dequantize first).
    case = _recon_case(heads=128 if group_size == 8192 else 2, group_size=group_size, dtype=dtype)
    cpu, gpu = case.tensors(), case.tensors("cuda")
    ops.aqua_reconstruct(**cpu)
    ops.aqua_reconstruct(**gpu)
    assert torch.equal(gpu["out"].cpu(), cpu["out"]) and torch.equal(gpu["hat_out"].cpu(), cpu["hat_out"])


def test_reconstruct_of_misaligned_views_and_on_a_side_stream() -> None:
    case = _recon_case(in_widths=(128, 128), pred_groups=2, rank=4)
    want = case.tensors()
    ops.aqua_reconstruct(**want)
    args = case.tensors("cuda")
    args["codes"] = torch.cat([torch.zeros_like(args["codes"][..., :1]), args["codes"]], -1)[..., 1:]  # offset 1 byte
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.aqua_reconstruct(**args)
    torch.cuda.current_stream().wait_stream(stream)
    # cuBLAS sums in its own order: close to the CPU result, not bitwise (the sweep holds both to the reference)
    torch.testing.assert_close(args["out"].cpu(), want["out"], rtol=2e-3, atol=2e-3)
