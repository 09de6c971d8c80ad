"""higgs_linear's fused CUDA kernel on a GPU (skipped without one), against the NumPy reference.

Same cases and the same float32 bound as tests/test_ops_higgs_linear.py (docs/ops.md): the kernel sums the
code-domain products in its own order (with fused multiply-adds), which the bound covers. The host emulator
(tests/test_cuda_emulated_higgs_linear.py) checks the same kernel bodies without a GPU.
"""
from __future__ import annotations

import aquakv.ops as ops
import pytest
import torch
from test_ops_higgs_linear import CASES, check_against_reference, make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_fused_kernel_is_registered_not_the_stand_in() -> None:
    assert not ops.CUDA_STAND_IN, "the extension was built without csrc/cuda/higgs_linear_cuda.cu"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}n{c[1]}-o{c[2]}g{c[3]}G{c[4]}-b{c[5]}-{c[6]}".replace(
    "torch.", ""))
def test_cuda_matches_reference_within_the_float32_bound(case) -> None:
    x, codes, scales, grid, signs, bias = make_case(*case)
    on = [t.cuda() if t is not None else None for t in (x, codes, scales, grid, signs, bias)]
    y = ops.higgs_linear(*on[:5], case[4], on[5]).cpu()
    check_against_reference(y, x, codes, scales, grid, signs, case[4], bias)


@pytest.mark.parametrize("batch", [1, 16, 512])
def test_cuda_large_layer_matches_the_cpu_kernel(batch: int) -> None:
    # A 4096-wide layer at a decode and a prefill batch: both devices within the bound of each other's error.
    x, codes, scales, grid, signs, bias = make_case(2, 256, 512, 16, 256, (batch,), torch.float16, 5, True)
    on = [t.cuda() for t in (x, codes, scales, grid, signs, bias)]
    y = ops.higgs_linear(*on[:5], 256, on[5]).cpu()
    check_against_reference(y, x, codes, scales, grid, signs, 256, bias)
