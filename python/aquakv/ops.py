"""Python face of the compiled ops `torch.ops.aquakv.*` (schemas: csrc/ops.cpp).

Each function here is a thin call into the op; this module adds the docstrings with shapes and
the fake (meta) kernels that let `torch.compile(fullgraph=True)` trace the ops. The NumPy truth
they are tested against lives in `aquakv.reference`.

Conventions: "rows" are all leading dims; ops work on the last dim. Non-contiguous inputs are
accepted (copied once); inputs with zero rows give empty outputs of the right shape.

Vocabulary: a HIGGS grid of n points in d dims codes d values with code_bits = log2(n) bits (so
code_bits / d bits per value). pack_bits / unpack_bits take `bits`, the width of one packed field;
HIGGS packs its codes with bits = code_bits.

The fake kernels apply the very checks of csrc/checks.h (same order, same messages), so a bad
call fails the same way on meta / FakeTensors as on a real device. Gradients: see docs/ops.md.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from aquakv import _C  # noqa: F401  (loads the library that defines torch.ops.aquakv.*)
from aquakv.ops_checks import (  # noqa: F401  (check_group_size is public here)
    check_aqua_reconstruct_args,
    check_hadamard_args,
    check_higgs_dequantize_args,
    check_higgs_linear_args,
    check_higgs_quantize_args,
    check_higgs_quantize_scaled_args,
    check_pack_args,
    check_unpack_args,
    check_group_size,
)

__all__ = [
    "hadamard", "higgs_quantize", "higgs_quantize_scaled", "higgs_dequantize", "pack_bits", "unpack_bits",
    "aqua_reconstruct", "higgs_linear", "check_group_size",
]


def hadamard(x: torch.Tensor, signs: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """y = scale * H (signs * x) over the last dim; H the unnormalised +-1 Sylvester Hadamard matrix.

    x: [..., n] float32/float16/bfloat16, n a power of two in 2..32768; signs: float32 [n] or None.
    scale = n ** -0.5 makes the transform orthonormal (and its own inverse).
    Differentiable in x and in signs (both enter linearly).
    Returns [..., n] in x's dtype, computed in float32.
    """
    return torch.ops.aquakv.hadamard(x, signs, scale)


def higgs_quantize(
    x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused HIGGS quantize (rotate, normalise, nearest grid point, pack), per group of G values.

    x: [..., C] float32/float16/bfloat16 with C % G == 0; grid: float32 [n, d] with n = 2**code_bits
    (code_bits in 1..8 or 16: bits per d-dim code); signs: float32 [G]; G = group_size as
    `check_group_size` states it. Returns (codes uint8 [..., C/d*code_bits/8], scales float16
    [..., C/G]). A group holding NaN/Inf gets a non-finite scale, and so does one whose norm exceeds
    the float16 range (65504). Not differentiable (backward through it raises).
    """
    return torch.ops.aquakv.higgs_quantize(x, grid, signs, group_size)


def higgs_quantize_scaled(
    x: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int
) -> torch.Tensor:
    """`higgs_quantize`'s nearest-grid search under GIVEN scales; returns the codes only.

    Per group: y = sqrt(G)/s * H_orth(signs * x_g) with s = float(scales[..., g]) instead of ||x_g||
    (y = 0 where s == 0; a NaN s gives code 0), then the nearest grid point of each d-vector (lowest index on
    exact ties). x: [..., C] float32/float16/bfloat16, C % G == 0; scales: float16 [..., C/G] with x's leading
    dims; grid, signs, group_size as for `higgs_quantize`. Returns codes uint8 [..., C/d*code_bits/8]:
    `higgs_dequantize(codes, scales, ...)` then decodes x under those scales. For re-encoding weights
    under their current (e.g. tuned) scales. Not differentiable (backward through it raises).
    """
    return torch.ops.aquakv.higgs_quantize_scaled(x, scales, grid, signs, group_size)


def higgs_dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    signs: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `higgs_quantize`: codes uint8 [..., C/d*code_bits/8], scales float16 [..., C/G] -> [..., C] in dtype.

    Differentiable w.r.t. scales only (the output is linear in them).
    """
    return torch.ops.aquakv.higgs_dequantize(codes, scales, grid, signs, group_size, dtype)


def higgs_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    signs: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W [out, in] = higgs_dequantize(codes, scales, ...), served from the codes.

    x: [..., in] float32/float16/bfloat16; codes uint8 [out, in/d*code_bits/8] and scales float16 [out, in/G]
    (every group inside one row of W, in = groups * G); grid, signs, group_size as for `higgs_dequantize`;
    bias: [out] in x's dtype, or None. Per output j: y_j = sum_g s_jg/G * <H(signs * x_g), grid[codes_jg]>:
    x is rotated once per group, the codes are read through the grid table, and the float weight is never
    built (batch <= 16) or only a tile at a time (prefill). float32 inside, rounded once to x's dtype.
    Differentiable w.r.t. x and bias.
    """
    return torch.ops.aquakv.higgs_linear(x, codes, scales, grid, signs, group_size, bias)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int32 [..., count] (low `bits` bits kept), bits in 1..8 or 16 -> uint8 [..., ceil(count*bits/8)].

    `bits` is the width of one packed field (for HIGGS codes: code_bits), not bits per value.
    LSB-first bitstream per row: code i fills bits [i*bits, (i+1)*bits), bit k in bit k%8 of byte k//8.
    """
    return torch.ops.aquakv.pack_bits(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """packed: uint8 [..., ceil(count*bits/8)] -> int32 [..., count]; inverse of `pack_bits`. 0 <= count <= 2**58."""
    return torch.ops.aquakv.unpack_bits(packed, bits, count)


def aqua_reconstruct(
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    signs: torch.Tensor,
    group_size: int,
    *,
    inputs: Sequence[torch.Tensor] = (),
    weights: Sequence[torch.Tensor] = (),
    bias: torch.Tensor,
    out: torch.Tensor,
    up: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    hat_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused AQUA-KV reconstruction of one block of cached tokens, written into `out`; returns `out`.

    Rows are [B, T] (batch, tokens), C = H * D channels (heads concatenated):
      r    = higgs_dequantize(codes, scales, grid, signs, group_size) in float32     [B, T, C]
      pred = per predictor group g (C/G channels each): sum_i inputs[i][..., g-th C_i/G slice] @ weights[i][g]
             (@ up[g] when given) + bias[g-th slice]
      hat  = pred + r -> hat_out                                                   [B, T, C] float32
      out[b, h, t, :] = rope(hat[b, t, h*D:(h+1)*D]), rounded once to out's dtype
    with rope(x) = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]) (Llama).

    codes uint8 [B, T, C/d*code_bits/8] and scales float16 [B, T, C/group_size], as `higgs_dequantize`
    takes them. inputs: [B, T, C_i] (none: an intercept-only predictor, pred = bias); weights: one per
    input, [G, C_i/G, M] with G >= 1 dividing C_i and C; M = C/G without `up`, the rank r with up
    [G, r, C/G]. inputs, weights and up share one dtype, the matmuls' own: float32, or bfloat16 (one
    matmul over the concatenated inputs, accumulated in float32 and rounded once to bfloat16, and once more
    after up; 2-4x faster on CPUs with AVX512-BF16 or AMX and on tensor cores). G = 1 is a dense map, G = H a per-head block-diagonal one. bias float32
    [C]. cos, sin: float32 [B, T, D] (D even), or both None for no rotation (then D = out.shape[-1]).
    out: float32/float16/bfloat16 [B, H, T, D] with any strides (e.g. a slice [:, :, t0:t1] of the
    buffer attention reads). hat_out: float32 [B, T, C] (any strides) or None.
    The matmuls follow torch's matmul settings (TF32 if enabled); the rest is float32 in a fixed
    order. Not differentiable (it writes into out).
    """
    torch.ops.aquakv.aqua_reconstruct(codes, scales, grid, signs, group_size, list(inputs), list(weights), up, bias,
                                      cos, sin, out, hat_out)
    return out


# ---- fake kernels: the checks above, then shapes and dtypes (torch.compile / meta tensors) ---


@torch.library.register_fake("aquakv::hadamard")
def _hadamard_fake(x: torch.Tensor, signs: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    check_hadamard_args(x, signs)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("aquakv::higgs_quantize")
def _higgs_quantize_fake(
    x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    group_bytes = check_higgs_quantize_args(x, grid, signs, group_size)
    groups = x.shape[-1] // group_size
    lead = x.shape[:-1]
    codes = x.new_empty((*lead, groups * group_bytes), dtype=torch.uint8)
    scales = x.new_empty((*lead, groups), dtype=torch.float16)
    return codes, scales


@torch.library.register_fake("aquakv::higgs_quantize_scaled")
def _higgs_quantize_scaled_fake(x, scales, grid, signs, group_size: int) -> torch.Tensor:
    group_bytes = check_higgs_quantize_scaled_args(x, scales, grid, signs, group_size)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // group_size * group_bytes), dtype=torch.uint8)


@torch.library.register_fake("aquakv::higgs_dequantize")
def _higgs_dequantize_fake(
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    signs: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    check_higgs_dequantize_args(codes, scales, grid, signs, group_size, dtype)
    return scales.new_empty((*scales.shape[:-1], scales.shape[-1] * group_size), dtype=dtype)


@torch.library.register_fake("aquakv::higgs_linear")
def _higgs_linear_fake(x, codes, scales, grid, signs, group_size: int, bias=None) -> torch.Tensor:
    out = check_higgs_linear_args(x, codes, scales, grid, signs, group_size, bias)
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake("aquakv::pack_bits")
def _pack_bits_fake(codes: torch.Tensor, bits: int) -> torch.Tensor:
    check_pack_args(codes, bits)
    count = codes.shape[-1]
    return codes.new_empty((*codes.shape[:-1], (count * bits + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("aquakv::unpack_bits")
def _unpack_bits_fake(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    check_unpack_args(packed, bits, count)
    return packed.new_empty((*packed.shape[:-1], count), dtype=torch.int32)


@torch.library.register_fake("aquakv::aqua_reconstruct")
def _aqua_reconstruct_fake(codes, scales, grid, signs, group_size, inputs, weights, up, bias, cos, sin, out,
                           hat_out) -> None:
    check_aqua_reconstruct_args(codes, scales, grid, signs, group_size, inputs, weights, up, bias, cos, sin, out,
                                 hat_out)


# ---- higgs_linear on CUDA where the extension was built without its kernel (csrc/cuda/higgs_linear_cuda.cu):
# decode, then one matmul (the old HiggsLinear path), so HiggsLinear still runs there, without the memory saving.


def _higgs_linear_decoded(x, codes, scales, grid, signs, group_size: int, bias=None) -> torch.Tensor:
    check_higgs_linear_args(x, codes, scales, grid, signs, group_size, bias)
    weight = higgs_dequantize(codes, scales, grid, signs, group_size, torch.float32)
    y = torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float())
    return y.to(x.dtype)


CUDA_STAND_IN = not torch._C._dispatch_has_kernel_for_dispatch_key("aquakv::higgs_linear", "CUDA")
if CUDA_STAND_IN:
    torch.library.register_kernel("aquakv::higgs_linear", "cuda", _higgs_linear_decoded)


# ---- autograd: backward formulas where the op has a derivative, a clear refusal where not -----


def _hadamard_setup(ctx, inputs, output) -> None:
    x, signs, scale = inputs
    ctx.scale = scale
    ctx.has_signs = signs is not None
    wants_signs_grad = signs is not None and signs.requires_grad
    ctx.save_for_backward(signs, x if wants_signs_grad else None)


def _hadamard_backward(ctx, grad: torch.Tensor):
    # y = scale * H D x is linear in x with H symmetric, so x_grad = D (scale * H g);
    # as a function of the signs, y = scale * H diag(x) s, so signs_grad = sum over rows of x * (scale * H g).
    signs, x = ctx.saved_tensors
    hg = hadamard(grad, None, ctx.scale)  # fp32 math, rounded once to grad's dtype
    grad_x = hg * signs.to(hg.dtype) if ctx.has_signs else hg  # times +-1: exact
    grad_signs = None
    if x is not None:
        grad_signs = (x.float() * hg.float()).reshape(-1, x.shape[-1]).sum(0)
    return grad_x, grad_signs, None


def _dequantize_setup(ctx, inputs, output) -> None:
    codes, scales, grid, signs, group_size, _dtype = inputs
    ctx.group_size = group_size
    ctx.constant_needing_grad = [name for name, t in (("grid", grid), ("signs", signs)) if t.requires_grad]
    ctx.save_for_backward(codes, scales, grid, signs)


def _dequantize_backward(ctx, grad: torch.Tensor):
    # x_g = s_g * u_g with u_g the group dequantized at scale 1, so d<grad, x>/d s_g = <u_g, grad_g>.
    if ctx.constant_needing_grad:
        names = " and ".join(ctx.constant_needing_grad)
        raise RuntimeError(f"higgs_dequantize: no gradient w.r.t. {names} (only scales are differentiable); "
                           f"pass {names} detached (.detach()) or with requires_grad=False")
    codes, scales, grid, signs = ctx.saved_tensors
    unit = higgs_dequantize(codes, torch.ones_like(scales), grid, signs, ctx.group_size, torch.float32)
    per_group = (unit * grad.float()).reshape(*scales.shape, ctx.group_size).sum(-1)
    return None, per_group.to(scales.dtype), None, None, None, None


def _linear_setup(ctx, inputs, output) -> None:
    x, codes, scales, grid, signs, group_size, bias = inputs
    ctx.group_size, ctx.has_bias, ctx.x_dtype = group_size, bias is not None, x.dtype
    ctx.constant_needing_grad = [n for n, t in (("scales", scales), ("grid", grid), ("signs", signs)) if t.requires_grad]
    ctx.save_for_backward(codes, scales, grid, signs)


def _linear_backward(ctx, grad: torch.Tensor):
    # y = x W^T + b: x_grad = grad W, bias_grad = grad summed over rows (W decoded once, float32).
    if ctx.constant_needing_grad:
        names = " and ".join(ctx.constant_needing_grad)
        raise RuntimeError(f"higgs_linear: no gradient w.r.t. {names} (only x and bias are differentiable); "
                           f"pass {names} detached, or use higgs_dequantize + F.linear to train them")
    codes, scales, grid, signs = ctx.saved_tensors
    weight = higgs_dequantize(codes, scales, grid, signs, ctx.group_size, torch.float32)
    grad_x = (grad.float() @ weight).to(ctx.x_dtype)
    grad_bias = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(grad.dtype) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, grad_bias


def _refuse_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: not differentiable (it produces integer codes; no backward is defined); "
                           "detach its inputs (.detach()) before calling it")

    return backward


def _no_setup(ctx, inputs, output) -> None:
    pass


torch.library.register_autograd("aquakv::hadamard", _hadamard_backward, setup_context=_hadamard_setup)
torch.library.register_autograd("aquakv::higgs_dequantize", _dequantize_backward, setup_context=_dequantize_setup)
torch.library.register_autograd("aquakv::higgs_linear", _linear_backward, setup_context=_linear_setup)
for _op in ("higgs_quantize", "higgs_quantize_scaled", "pack_bits", "unpack_bits"):
    torch.library.register_autograd(f"aquakv::{_op}", _refuse_backward(_op), setup_context=_no_setup)
