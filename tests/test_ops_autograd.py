"""Gradients of the ops: hadamard (linear in x and in signs) and higgs_dequantize (linear in scales)
have backward formulas; higgs_quantize, pack_bits and unpack_bits refuse backward with a message.

The kernels compute in float32 only, so torch.autograd.gradcheck runs in float32 with a stated
tolerance: the ops are linear in the inputs checked, so central differences are exact up to
rounding, about ulp(|y|) / eps = 1e-7 * 4 / 1e-2 = 4e-5 here; atol = rtol = 1e-3 leaves room and
still catches a wrong sign, a missing scale or a transposed rotation (errors of order 1).
The exact truth is the adjoint computed in float64 with NumPy (aquakv.reference).
"""
from __future__ import annotations

import warnings

import aquakv.ops as ops
import numpy as np
import pytest
import torch
from aquakv import reference as ref
from sweeps import random_grid, random_values

FP32_GRADCHECK = dict(eps=1e-2, atol=1e-3, rtol=1e-3, check_undefined_grad=False)


def signs_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(ref.random_signs(n, seed=seed))


# ---- hadamard ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 16, 256])
@pytest.mark.parametrize("with_signs", [True, False])
def test_hadamard_grad_is_the_adjoint(n: int, with_signs: bool) -> None:
    # y = scale * H D x  =>  x_grad = D (scale * H g), H symmetric.
    scale = n**-0.5
    x = random_values((3, 2, n), torch.float32, seed=n).requires_grad_()
    signs = signs_of(n) if with_signs else None
    g = random_values((3, 2, n), torch.float32, seed=n + 1)
    ops.hadamard(x, signs, scale).backward(g)
    want = scale * (g.double().numpy() @ ref.hadamard_matrix(n))
    if with_signs:
        want = want * signs.double().numpy()
    np.testing.assert_allclose(x.grad.double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_hadamard_grad_keeps_the_input_dtype(dtype: torch.dtype) -> None:
    x = random_values((4, 64), dtype, seed=1).requires_grad_()
    g = random_values((4, 64), dtype, seed=2)
    ops.hadamard(x, signs_of(64), 0.125).backward(g)
    assert x.grad.dtype == dtype
    want = 0.125 * (g.double().numpy() @ ref.hadamard_matrix(64)) * signs_of(64).double().numpy()
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # one rounding of an O(1) result to the dtype
    np.testing.assert_allclose(x.grad.double().numpy(), want, rtol=tol, atol=tol)


def test_hadamard_signs_grad() -> None:
    # y = scale * H diag(x) s  =>  signs_grad = sum over rows of x * (scale * H g).
    n, scale = 32, 0.25
    x = random_values((5, n), torch.float32, seed=3)
    signs = signs_of(n).requires_grad_()
    g = random_values((5, n), torch.float32, seed=4)
    ops.hadamard(x, signs, scale).backward(g)
    want = (x.double().numpy() * (scale * g.double().numpy() @ ref.hadamard_matrix(n))).sum(0)
    np.testing.assert_allclose(signs.grad.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_hadamard_gradcheck_fp32() -> None:
    x = random_values((2, 8), torch.float32, seed=5).requires_grad_()
    signs = signs_of(8).requires_grad_()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not a double precision.*")
        assert torch.autograd.gradcheck(lambda a, s: ops.hadamard(a, s, 8**-0.5), (x, signs), **FP32_GRADCHECK)


def test_hadamard_backward_gives_no_autograd_warning() -> None:
    # Before a backward was registered: outputs claimed requires_grad, backward warned and gave None.
    x = random_values((2, 16), torch.float32, seed=6).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.hadamard(x, None, 0.25).sum().backward()
    assert x.grad is not None


def test_hadamard_double_backward() -> None:
    # The backward is itself a hadamard, so it differentiates again: for L = ||H D x||^2 (scale 1),
    # dL/dx = 2 D H H D x = 2n x and the Hessian is 2n I.
    n = 8
    x = random_values((2, n), torch.float32, seed=7).requires_grad_()
    (gx,) = torch.autograd.grad(ops.hadamard(x, signs_of(n), 1.0).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, 2 * n * x.detach(), rtol=1e-5, atol=1e-5)
    (hv,) = torch.autograd.grad(gx.sum(), x)
    torch.testing.assert_close(hv, torch.full_like(x, 2.0 * n), rtol=1e-5, atol=1e-5)


# ---- higgs_dequantize --------------------------------------------------------------------------


def quantized(seed: int = 0, group_size: int = 64, d: int = 2, n_points: int = 16):
    x = random_values((3, 2 * group_size), torch.float32, seed=seed)
    grid = random_grid(n_points, d, seed=seed)
    signs = signs_of(group_size, seed)
    codes, scales = ops.higgs_quantize(x, grid, signs, group_size)
    return codes, scales, grid, signs, group_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_dequantize_scales_grad_matches_the_reference(dtype: torch.dtype) -> None:
    # x_g = s_g * u_g (u_g: the group at scale 1)  =>  scales_grad_g = <u_g, grad_g>.
    codes, scales, grid, signs, group_size = quantized()
    s = scales.clone().requires_grad_()
    g = random_values((3, 2 * group_size), dtype, seed=9)
    ops.higgs_dequantize(codes, s, grid, signs, group_size, dtype).backward(g)
    assert s.grad.dtype == torch.float16 and s.grad.shape == scales.shape
    unit = ref.higgs_dequantize(codes.numpy(), np.ones(scales.shape, np.float16), grid.numpy(), signs.numpy(),
                                group_size, dtype=np.float64)
    want = (unit * g.double().numpy()).reshape(3, 2, group_size).sum(-1)
    # the gradient is stored in float16 (the scales' dtype): one rounding, 2**-11 relative
    np.testing.assert_allclose(s.grad.double().numpy(), want, rtol=2e-3, atol=2e-3)


def test_dequantize_scales_grad_is_a_finite_difference() -> None:
    # Linear in the scales, and doubling one fp16 scale is exact: (L(s + s_k e_k) - L(s)) / s_k = grad_k.
    codes, scales, grid, signs, group_size = quantized(seed=1)
    g = random_values((3, 2 * group_size), torch.float32, seed=10).double()

    def loss(sc: torch.Tensor) -> float:
        return float((ops.higgs_dequantize(codes, sc, grid, signs, group_size).double() * g).sum())

    s = scales.clone().requires_grad_()
    (ops.higgs_dequantize(codes, s, grid, signs, group_size).double() * g).sum().backward()
    base = loss(scales)
    for k in np.ndindex(*scales.shape):
        bumped = scales.clone()
        bumped[k] = bumped[k] * 2
        fd = (loss(bumped) - base) / float(scales[k])
        assert abs(fd - float(s.grad[k])) <= 2e-3 * max(1.0, abs(fd)), (k, fd, float(s.grad[k]))


@pytest.mark.parametrize("name", ["grid", "signs"])
def test_dequantize_refuses_grad_for_grid_and_signs(name: str) -> None:
    codes, scales, grid, signs, group_size = quantized()
    args = dict(codes=codes, scales=scales.clone().requires_grad_(), grid=grid, signs=signs, group_size=group_size)
    args[name] = args[name].clone().requires_grad_()
    out = ops.higgs_dequantize(**args)
    with pytest.raises(RuntimeError, match=f"higgs_dequantize: no gradient w.r.t. {name}"):
        out.sum().backward()


# ---- ops without a derivative ------------------------------------------------------------------


def test_quantize_backward_refuses() -> None:
    x = random_values((2, 128), torch.float32, seed=11).requires_grad_()
    codes, scales = ops.higgs_quantize(x, random_grid(16, 2, seed=0), signs_of(64), 64)
    assert not codes.requires_grad  # integer outputs never carry gradients
    with pytest.raises(RuntimeError, match="higgs_quantize: not differentiable"):
        scales.float().sum().backward()


@pytest.mark.parametrize("name", ["higgs_quantize", "higgs_quantize_scaled", "pack_bits", "unpack_bits", "hadamard",
                                  "higgs_dequantize"])
def test_every_op_has_an_autograd_kernel(name: str) -> None:
    # pack_bits / unpack_bits take integer tensors, which cannot require grad; their kernel still
    # refuses backward, so no op is left to the silent "returns None with a warning" fallback.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aquakv::{name}", "Autograd")


def test_refusal_message_of_bitpack_ops() -> None:
    backward = ops._refuse_backward("unpack_bits")
    with pytest.raises(RuntimeError, match="unpack_bits: not differentiable"):
        backward(None, torch.zeros(1))


# ---- opcheck with inputs that require grad ----------------------------------------------------


def test_opcheck_hadamard_with_grad() -> None:
    x = random_values((3, 32), torch.float32, seed=12).requires_grad_()
    torch.library.opcheck(torch.ops.aquakv.hadamard.default, (x, signs_of(32).requires_grad_(), 32**-0.5))
    torch.library.opcheck(torch.ops.aquakv.hadamard.default, (x, None, 1.0))


def test_opcheck_dequantize_with_grad() -> None:
    codes, scales, grid, signs, group_size = quantized()
    args = (codes, scales.clone().requires_grad_(), grid, signs, group_size, torch.float32)
    torch.library.opcheck(torch.ops.aquakv.higgs_dequantize.default, args)


def test_opcheck_quantize_autograd_registration() -> None:
    # No aot_dispatch test here: tracing a backward of higgs_quantize fails by design.
    x = random_values((2, 128), torch.float32, seed=13).requires_grad_()
    torch.library.opcheck(torch.ops.aquakv.higgs_quantize.default, (x, random_grid(16, 2, seed=0), signs_of(64), 64),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_backward_matches_eager() -> None:
    signs = signs_of(64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return ops.hadamard(x, signs, 0.125).pow(2).sum()

    x = random_values((4, 64), torch.float32, seed=14)
    eager = x.clone().requires_grad_()
    f(eager).backward()
    compiled = x.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(compiled).backward()
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=0, atol=0)
