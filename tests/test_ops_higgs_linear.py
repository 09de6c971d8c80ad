"""higgs_linear: the linear layer served from HIGGS codes, against the NumPy reference, on every CPU path.

Accuracy bound (docs/ops.md), per output y_j, from the float32 operations the kernels do in some order:
  |y - ref| <= eps32 * ((in + 2) * dot + (log2(G) + 1) * rot) + eps_out / 2 * |ref|
with dot and rot from `reference.higgs_linear_abs_terms`: any float32 summation order of the in code-domain
products (and the scale multiply) is within gamma_(in+2) of the sum of their absolute values, and the rotation
H(signs x_g) is log2(G) roundings deep, each element off by at most log2(G) eps32 * ||x_g||_1. The last term is
the one rounding to x's dtype. Measured use of the budget is printed with -s (a few percent: the bound is a
worst case over summation orders); the sensitivity test shows one wrong code breaks it.
"""
from __future__ import annotations

import math

import aquakv.ops as ops
import numpy as np
import pytest
import torch
from aquakv import reference as ref
from aquakv.grids import available_grids
from sweeps import random_grid, random_values, valid_group_sizes

ISAS = ("avx512", "avx2", "baseline")  # AQUAKV_HIGGS_LINEAR_ISA caps the path; missing ISAs fall back


def make_case(d: int, n: int, out: int, groups: int, group_size: int, batch: tuple, dtype, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    grid = random_grid(n, d, seed)
    signs = torch.from_numpy(ref.random_signs(group_size, seed + 1))
    weight = random_values((out, groups * group_size), torch.float32, seed + 2)
    codes, scales = ops.higgs_quantize(weight, grid, signs, group_size)
    x = random_values((*batch, groups * group_size), torch.float32, seed + 3)
    x = (x / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)).to(dtype)  # heavy tails, |x| <= 1: fp16 y stays finite
    b = torch.randn(out, generator=gen).to(dtype) if bias else None
    return x, codes, scales, grid, signs, b


def check_against_reference(y, x, codes, scales, grid, signs, group_size, bias) -> float:
    """Assert the bound of the module doc; returns the share of the budget used."""
    args = (to64(x), codes.numpy(), scales.numpy(), grid.numpy(), signs.numpy(), group_size)
    want = ref.higgs_linear(*args, None if bias is None else to64(bias), np.float64)
    dot, rot = ref.higgs_linear_abs_terms(*args)
    eps32, eps_out = np.finfo(np.float32).eps, torch.finfo(x.dtype).eps
    bound = eps32 * ((x.shape[-1] + 2) * dot + (math.log2(group_size) + 1) * rot) + eps_out / 2 * np.abs(want)
    bound = bound + np.finfo(np.float32).tiny
    err = np.abs(to64(y) - want)
    assert y.shape == want.shape and y.dtype == x.dtype
    assert (err <= bound).all(), f"worst error {float((err / bound).max()):.3g} x the bound"
    return float((err / bound).max())


def to64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def cases(count: int, seed: int = 0) -> list[tuple]:
    """Every shipped (d, n) at least once, random group sizes, shapes, batch sizes both sides of 16, dtypes."""
    rng = np.random.default_rng(seed)
    grids = available_grids()
    out = []
    for i in range(count):
        d, n = grids[i % len(grids)]
        group_size = int(rng.choice(valid_group_sizes(d, n, lo=2 * d, hi=512)))
        groups = int(rng.integers(1, max(2, 2048 // group_size // 4) + 1))
        rows = [(1,), (3,), (16,), (17,), (2, 9), (40,)][int(rng.integers(6))]
        dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        out.append((d, n, int(rng.integers(1, 70)), groups, group_size, rows, dtype, 100 + i, bool(i % 2)))
    return out


CASES = cases(33)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}n{c[1]}-o{c[2]}g{c[3]}G{c[4]}-b{c[5]}-{c[6]}".replace(
    "torch.", ""))
def test_matches_reference_within_the_float32_bound(case, isa, monkeypatch) -> None:
    monkeypatch.setenv("AQUAKV_HIGGS_LINEAR_ISA", isa)
    x, codes, scales, grid, signs, bias = make_case(*case)
    y = ops.higgs_linear(x, codes, scales, grid, signs, case[4], bias)
    used = check_against_reference(y, x, codes, scales, grid, signs, case[4], bias)
    print(f"{case}: {used:.3f} of the bound")


@pytest.mark.parametrize("d,n", available_grids())
def test_shipped_grids_equal_dequantize_then_matmul(d: int, n: int) -> None:
    from aquakv.grids import get_grid

    grid, group_size = get_grid(d, n), 128 if n < 65536 else 256
    signs = torch.from_numpy(ref.random_signs(group_size, 5))
    codes, scales = ops.higgs_quantize(random_values((48, 4 * group_size), torch.float32, 6), grid, signs, group_size)
    for batch in (1, 7, 33):
        x = random_values((batch, 4 * group_size), torch.float32, 7 + batch)
        y = ops.higgs_linear(x, codes, scales, grid, signs, group_size)
        dense = torch.nn.functional.linear(x, ops.higgs_dequantize(codes, scales, grid, signs, group_size))
        check_against_reference(y, x, codes, scales, grid, signs, group_size, None)
        check_against_reference(dense, x, codes, scales, grid, signs, group_size, None)


def test_one_wrong_code_breaks_the_bound() -> None:
    x, codes, scales, grid, signs, _ = make_case(2, 16, 8, 2, 64, (3,), torch.float32, 9, False)
    y = ops.higgs_linear(x, codes, scales, grid, signs, 64)
    wrong = codes.clone()
    wrong[5, 3] ^= 0x01  # one 4-bit code of row 5 now names another grid point
    y_wrong = ops.higgs_linear(x, wrong, scales, grid, signs, 64)
    assert not torch.equal(y, y_wrong)
    with pytest.raises(AssertionError, match="x the bound"):
        check_against_reference(y_wrong, x, codes, scales, grid, signs, 64, None)


def test_isa_paths_agree_closely(monkeypatch) -> None:
    x, codes, scales, grid, signs, bias = make_case(2, 64, 37, 3, 128, (5,), torch.float32, 11, True)
    got = {}
    for isa in ISAS:
        monkeypatch.setenv("AQUAKV_HIGGS_LINEAR_ISA", isa)
        got[isa] = ops.higgs_linear(x, codes, scales, grid, signs, 128, bias)
    for isa in ISAS[1:]:
        torch.testing.assert_close(got[isa], got["avx512"], rtol=1e-5, atol=1e-5)


def test_leading_dims_empty_rows_and_non_contiguous() -> None:
    x, codes, scales, grid, signs, bias = make_case(1, 16, 6, 2, 32, (4, 3), torch.float32, 12, True)
    y = ops.higgs_linear(x, codes, scales, grid, signs, 32, bias)
    assert y.shape == (4, 3, 6)
    flat = ops.higgs_linear(x.reshape(12, 64), codes, scales, grid, signs, 32, bias)
    torch.testing.assert_close(y.reshape(12, 6), flat, rtol=0, atol=0)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(ops.higgs_linear(strided, codes, scales, grid, signs, 32, bias), y, rtol=0, atol=0)
    assert ops.higgs_linear(x[:0], codes, scales, grid, signs, 32, bias).shape == (0, 3, 6)


GRID, SIGNS = random_grid(16, 2, seed=0), torch.from_numpy(ref.random_signs(128, seed=0))
CODES, SCALES = ops.higgs_quantize(torch.randn(5, 256), GRID, SIGNS, 128)
X, BIAS = torch.randn(3, 256), torch.randn(5)

BAD = [
    (dict(x=X.double()), "higgs_linear: x must be float32, float16 or bfloat16, got torch.float64"),
    (dict(x=torch.tensor(1.0)), "higgs_linear: x must have at least 1 dim"),
    (dict(codes=CODES[None]), "higgs_linear: codes must be 2-D \\[out, groups \\* bytes per group\\], got shape "
     "\\[1, 5, 64\\]"),
    (dict(scales=SCALES[None]), "higgs_linear: scales must be 2-D \\[out, groups\\]"),
    (dict(codes=CODES.char()), "higgs_linear: codes must be torch.uint8, got torch.int8"),
    (dict(scales=SCALES.float()), "higgs_linear: scales must be torch.float16, got torch.float32"),
    (dict(grid=GRID.half()), "higgs_linear: grid must be torch.float32"),
    (dict(signs=SIGNS[:64]), "higgs_linear: signs must be 1-D of length group_size = 128"),
    (dict(group_size=96, signs=SIGNS[:96]), "higgs_linear: group_size 96 must be a power of two"),
    (dict(codes=CODES[:4]), "higgs_linear: codes \\[4, 64\\] and scales \\[5, 2\\] must have the same leading dims"),
    (dict(codes=CODES[:, :50]), "higgs_linear: codes last dim 50 does not match 2 groups"),
    (dict(x=X[:, :128]), "higgs_linear: x last dim 128 does not match the weight's in = 2 groups \\(scales last "
     "dim\\) \\* group_size 128 = 256"),
    (dict(bias=BIAS.half()), "higgs_linear: bias must be torch.float32 like x, got torch.float16"),
    (dict(bias=BIAS[:4]), "higgs_linear: bias must be 1-D of length out = 5, got shape \\[4\\]"),
]


@pytest.mark.parametrize("override,message", BAD, ids=lambda v: v[:60] if isinstance(v, str) else None)
def test_bad_inputs_are_refused_the_same_on_the_fake_kernel(override: dict, message: str) -> None:
    args = dict(x=X, codes=CODES, scales=SCALES, grid=GRID, signs=SIGNS, group_size=128, bias=BIAS) | override
    with pytest.raises(RuntimeError, match=message) as real:
        ops.higgs_linear(**args)
    with pytest.raises(RuntimeError) as fake:
        ops.higgs_linear(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert str(fake.value) == str(real.value)


@pytest.mark.parametrize("name", ["x", "codes", "scales", "grid", "signs", "bias"])
def test_one_tensor_on_meta_is_refused_by_name(name: str) -> None:
    args = dict(x=X, codes=CODES, scales=SCALES, grid=GRID, signs=SIGNS, group_size=128, bias=BIAS)
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=f"higgs_linear: .*{name} is on meta"):
        ops.higgs_linear(**args)


@pytest.mark.parametrize("batch", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype, batch: int) -> None:
    x = torch.randn(batch, 256).to(dtype)
    for bias in (None, BIAS.to(dtype)):
        torch.library.opcheck(torch.ops.aquakv.higgs_linear.default, (x, CODES, SCALES, GRID, SIGNS, 128, bias))


def test_compiled_fullgraph_matches_eager() -> None:
    def layer(x):
        return torch.relu(ops.higgs_linear(x * 2.0, CODES, SCALES, GRID, SIGNS, 128, BIAS))

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    for rows in (3, 5):
        x = torch.randn(rows, 256)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_gradients_are_those_of_the_dequantized_linear() -> None:
    weight = ops.higgs_dequantize(CODES, SCALES, GRID, SIGNS, 128)
    x, bias = X.clone().requires_grad_(), BIAS.clone().requires_grad_()
    grad = torch.randn(3, 5)
    ops.higgs_linear(x, CODES, SCALES, GRID, SIGNS, 128, bias).backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, grad.sum(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="higgs_linear: no gradient w.r.t. grid"):
        ops.higgs_linear(X, CODES, SCALES, GRID.clone().requires_grad_(), SIGNS, 128).sum().backward()


def test_cuda_stand_in_is_registered_and_equals_the_op_on_the_cpu() -> None:
    # The CUDA kernel is the Python stand-in until a fused one lands; its math runs on any device.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aquakv::higgs_linear", "CUDA")
    x, codes, scales, grid, signs, bias = make_case(2, 256, 9, 2, 64, (3,), torch.bfloat16, 13, True)
    got = ops._higgs_linear_decoded(x, codes, scales, grid, signs, 64, bias)
    check_against_reference(got, x, codes, scales, grid, signs, 64, bias)
