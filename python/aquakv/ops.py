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

__all__ = [
    "hadamard", "higgs_quantize", "higgs_quantize_scaled", "higgs_dequantize", "pack_bits", "unpack_bits",
    "aqua_reconstruct", "check_group_size",
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
    takes them. inputs: float32 [B, T, C_i] (none: an intercept-only predictor, pred = bias); weights:
    one per input, float32 [G, C_i/G, M] with G >= 1 dividing C_i and C; M = C/G without `up`, the rank r
    with up float32 [G, r, C/G]. G = 1 is a dense map, G = H a per-head block-diagonal one. bias float32
    [C]. cos, sin: float32 [B, T, D] (D even), or both None for no rotation (then D = out.shape[-1]).
    out: float32/float16/bfloat16 [B, H, T, D] with any strides (e.g. a slice [:, :, t0:t1] of the
    buffer attention reads). hat_out: float32 [B, T, C] (any strides) or None.
    The matmuls follow torch's float32 matmul settings (TF32 if enabled); the rest is float32 in a fixed
    order. Not differentiable (it writes into out).
    """
    torch.ops.aquakv.aqua_reconstruct(codes, scales, grid, signs, group_size, list(inputs), list(weights), up, bias,
                                      cos, sin, out, hat_out)
    return out


# ---- input checks: csrc/checks.h item by item, in the same order, with the same messages ------
# Failures raise RuntimeError like TORCH_CHECK does. torch._check keeps them usable on symbolic
# shapes (torch.compile): a condition it cannot decide becomes a runtime assert, not a crash.

_MAX_HADAMARD = 32768
_MAX_COUNT = 2**58  # count * 16 must fit in int64 on the C++ side
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require(ok, message) -> None:
    torch._check(ok, lambda: message if isinstance(message, str) else message())


def _is_power_of_two(v) -> bool:
    v = int(v)  # a symbolic size is specialised here: the kernels are specialised on it too
    return v > 0 and (v & (v - 1)) == 0


def _sizes(t: torch.Tensor) -> str:
    return str(list(t.shape))  # "[16, 2]", how c10 prints IntArrayRef


def _check_at_least_1d(op: str, name: str, t: torch.Tensor) -> None:
    _require(t.dim() >= 1, lambda: f"{op}: {name} must have at least 1 dim (the last dim is the one transformed), "
             "got a 0-dim tensor")


def _check_float_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    _require(dtype in _FLOAT_DTYPES, lambda: f"{op}: {name} must be float32, float16 or bfloat16, got {dtype}")


def _check_dtype(op: str, name: str, t: torch.Tensor, want: torch.dtype) -> None:
    _require(t.dtype == want, lambda: f"{op}: {name} must be {want}, got {t.dtype}")


def _check_same_device(op: str, *named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named:
        _require(t.device == first.device, lambda: f"{op}: {name} is on {t.device} but {first_name} is on "
                 f"{first.device}; all tensors must be on the same device")


def _check_bits(op: str, bits: int) -> None:
    _require(1 <= bits <= 8 or bits == 16, lambda: f"{op}: bits must be in 1..8 or 16, got {bits}")


def _check_count(op: str, count: int) -> None:
    _require(count >= 0, lambda: f"{op}: count must be >= 0, got {count}")
    _require(count <= _MAX_COUNT, lambda: f"{op}: count {count} is too large (at most 2**58 codes per row)")


def _check_hadamard_size(op: str, what: str, n: int) -> None:
    _require(_is_power_of_two(n) and 2 <= n <= _MAX_HADAMARD,
             lambda: f"{op}: {what} {n} must be a power of two in 2..{_MAX_HADAMARD}")


def _check_signs(op: str, signs: torch.Tensor, n: int, n_name: str) -> None:
    _check_dtype(op, "signs", signs, torch.float32)
    _require(signs.dim() == 1 and signs.shape[0] == n,
             lambda: f"{op}: signs must be 1-D of length {n_name} = {n}, got shape {_sizes(signs)}")


def _check_grid(op: str, grid: torch.Tensor) -> int:
    """Returns code_bits = log2(n_points)."""
    _check_dtype(op, "grid", grid, torch.float32)
    _require(grid.dim() == 2 and grid.shape[1] >= 1,
             lambda: f"{op}: grid must be 2-D [n_points, d] with d >= 1, got shape {_sizes(grid)}")
    n = grid.shape[0]
    _require(_is_power_of_two(n) and (2 <= n <= 256 or n == 65536),
             lambda: f"{op}: grid has {n} points; it must have 2**code_bits points with code_bits in 1..8 or 16")
    return int(n).bit_length() - 1


def check_group_size(group_size: int, dim: int, code_bits: int, *, op: str = "check_group_size") -> None:
    """The one group-size rule of HIGGS (csrc/checks.h check_group_size, same messages); raises RuntimeError.

    group_size must be a power of two in 2..32768, a multiple of the grid dim `dim`, and its
    group_size/dim codes of `code_bits` bits each (code_bits = log2(grid points)) must fill whole
    bytes: (group_size / dim * code_bits) % 8 == 0, so every group's codes start on a byte boundary.
    `op` names the caller in the message.
    """
    _require(dim >= 1, lambda: f"{op}: grid dim d must be >= 1, got {dim}")
    _require(1 <= code_bits <= 8 or code_bits == 16, lambda: f"{op}: code_bits must be in 1..8 or 16, got {code_bits}")
    _check_hadamard_size(op, "group_size", group_size)
    _require(group_size % dim == 0, lambda: f"{op}: group_size {group_size} is not a multiple of the grid dim d = {dim}")
    per_group = group_size // dim * code_bits
    _require(per_group % 8 == 0, lambda: f"{op}: group_size {group_size} / d {dim} * code_bits {code_bits} = "
             f"{per_group} bits of codes per group is not a multiple of 8; each group's codes must fill whole bytes "
             "so groups stay byte-aligned")


def _check_hadamard_args(x: torch.Tensor, signs: torch.Tensor | None) -> None:
    op = "hadamard"
    _check_at_least_1d(op, "x", x)
    _check_float_dtype(op, "x", x.dtype)
    _check_hadamard_size(op, "last dim of x", x.shape[-1])
    if signs is not None:
        _check_signs(op, signs, x.shape[-1], "x.size(-1)")
        _check_same_device(op, ("x", x), ("signs", signs))


def _check_higgs_common(op: str, grid: torch.Tensor, signs: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    """Returns (d, code_bits, bytes of codes per group)."""
    code_bits = _check_grid(op, grid)
    d = grid.shape[1]
    check_group_size(group_size, d, code_bits, op=op)
    _check_signs(op, signs, group_size, "group_size")
    return d, code_bits, group_size // d * code_bits // 8


def _check_higgs_quantize_args(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int) -> int:
    """Returns bytes of codes per group."""
    op = "higgs_quantize"
    _check_at_least_1d(op, "x", x)
    _check_float_dtype(op, "x", x.dtype)
    _, _, group_bytes = _check_higgs_common(op, grid, signs, group_size)
    channels = x.shape[-1]
    _require(channels % group_size == 0, lambda: f"{op}: last dim {channels} is not a multiple of group_size "
             f"{group_size} (pad x with zeros to a multiple and trim after dequantize)")
    _check_same_device(op, ("x", x), ("grid", grid), ("signs", signs))
    return group_bytes


def _check_higgs_quantize_scaled_args(x, scales, grid, signs, group_size: int) -> int:
    """Returns bytes of codes per group."""
    op = "higgs_quantize_scaled"
    _check_at_least_1d(op, "x", x)
    _check_at_least_1d(op, "scales", scales)
    _check_float_dtype(op, "x", x.dtype)
    _check_dtype(op, "scales", scales, torch.float16)
    _, _, group_bytes = _check_higgs_common(op, grid, signs, group_size)
    channels = x.shape[-1]
    _require(channels % group_size == 0, lambda: f"{op}: last dim {channels} is not a multiple of group_size "
             f"{group_size} (pad x with zeros to a multiple and trim after dequantize)")
    want = [*x.shape[:-1], channels // group_size]
    _require(list(scales.shape) == want, lambda: f"{op}: scales must be [..., C/group_size] = {want} (x's leading "
             f"dims), got shape {_sizes(scales)}")
    _check_same_device(op, ("x", x), ("scales", scales), ("grid", grid), ("signs", signs))
    return group_bytes


def _check_codes_match_scales(op: str, codes, scales, group_size: int, d: int, code_bits: int, group_bytes: int) -> None:
    _require(codes.dim() == scales.dim() and codes.shape[:-1] == scales.shape[:-1],
             lambda: f"{op}: codes {_sizes(codes)} and scales {_sizes(scales)} must have the same leading dims")
    groups = scales.shape[-1]
    _require(codes.shape[-1] == groups * group_bytes,
             lambda: f"{op}: codes last dim {codes.shape[-1]} does not match {groups} groups (scales last dim) * "
             f"{group_bytes} bytes per group (group_size {group_size} / d {d} * code_bits {code_bits} / 8)")


def _check_higgs_dequantize_args(codes, scales, grid, signs, group_size: int, dtype: torch.dtype) -> None:
    op = "higgs_dequantize"
    _check_at_least_1d(op, "codes", codes)
    _check_at_least_1d(op, "scales", scales)
    _check_dtype(op, "codes", codes, torch.uint8)
    _check_dtype(op, "scales", scales, torch.float16)
    _check_float_dtype(op, "dtype", dtype)
    d, code_bits, group_bytes = _check_higgs_common(op, grid, signs, group_size)
    _check_codes_match_scales(op, codes, scales, group_size, d, code_bits, group_bytes)
    _check_same_device(op, ("codes", codes), ("scales", scales), ("grid", grid), ("signs", signs))


def _check_aqua_reconstruct_args(codes, scales, grid, signs, group_size: int, inputs, weights, up, bias, cos, sin,
                                 out, hat_out) -> None:
    op = "aqua_reconstruct"
    _require(codes.dim() == 3, lambda: f"{op}: codes must be 3-D [B, T, bytes], got shape {_sizes(codes)}")
    _require(scales.dim() == 3, lambda: f"{op}: scales must be 3-D [B, T, C/group_size], got shape {_sizes(scales)}")
    _check_dtype(op, "codes", codes, torch.uint8)
    _check_dtype(op, "scales", scales, torch.float16)
    d, code_bits, group_bytes = _check_higgs_common(op, grid, signs, group_size)
    _check_codes_match_scales(op, codes, scales, group_size, d, code_bits, group_bytes)
    b, t, c = scales.shape[0], scales.shape[1], scales.shape[2] * group_size
    _require(len(inputs) == len(weights),
             lambda: f"{op}: got {len(inputs)} inputs but {len(weights)} weights; each input needs its weight")
    groups = inner = 0
    for i, (x, w) in enumerate(zip(inputs, weights)):
        _check_dtype(op, f"inputs[{i}]", x, torch.float32)
        _require(x.dim() == 3 and x.shape[0] == b and x.shape[1] == t, lambda: f"{op}: inputs[{i}] must be "
                 f"[B, T, C_i] with B, T = {b}, {t} (scales' leading dims), got shape {_sizes(x)}")
        _check_dtype(op, f"weights[{i}]", w, torch.float32)
        _require(w.dim() == 3, lambda: f"{op}: weights[{i}] must be 3-D [G, C_i/G, M], got shape {_sizes(w)}")
        if i == 0:
            groups = w.shape[0]
            _require(groups >= 1, lambda: f"{op}: weights[0] has G = 0 groups; G must be >= 1")
            _require(c % groups == 0, lambda: f"{op}: C = {c} channels (scales last dim * group_size) is not a "
                     f"multiple of G = {groups} (weights' first dim)")
            if up is not None:
                _check_dtype(op, "up", up, torch.float32)
                _require(up.dim() == 3 and up.shape[0] == groups and up.shape[2] == c // groups,
                         lambda: f"{op}: up must be [G, r, C/G] = [{groups}, r, {c // groups}], got shape {_sizes(up)}")
                inner = up.shape[1]
            else:
                inner = c // groups
        _require(w.shape[0] == groups, lambda: f"{op}: weights[{i}] has {w.shape[0]} groups but weights[0] has "
                 f"{groups}; all weights must share G")
        _require(x.shape[2] % groups == 0, lambda: f"{op}: inputs[{i}] last dim {x.shape[2]} is not a multiple of "
                 f"G = {groups} (weights' first dim)")
        m_name = "the rank, up's second dim" if up is not None else "C/G without up"
        _require(w.shape[1] == x.shape[2] // groups and w.shape[2] == inner, lambda: f"{op}: weights[{i}] must be "
                 f"[G, C_i/G, M] = [{groups}, {x.shape[2] // groups}, {inner}] (M = {m_name}), got shape {_sizes(w)}")
    _require(not (len(inputs) == 0 and up is not None),
             lambda: f"{op}: up must be None when there are no inputs (an intercept-only predictor)")
    _check_dtype(op, "bias", bias, torch.float32)
    _require(bias.dim() == 1 and bias.shape[0] == c,
             lambda: f"{op}: bias must be 1-D of length C = {c}, got shape {_sizes(bias)}")
    _require((cos is None) == (sin is None),
             lambda: f"{op}: cos and sin must be given together (both None: no RoPE)")
    _check_float_dtype(op, "out", out.dtype)
    _require(out.dim() == 4, lambda: f"{op}: out must be 4-D [B, H, T, D], got shape {_sizes(out)}")
    if cos is not None:
        _check_dtype(op, "cos", cos, torch.float32)
        _check_dtype(op, "sin", sin, torch.float32)
        _require(cos.dim() == 3 and cos.shape[0] == b and cos.shape[1] == t,
                 lambda: f"{op}: cos must be [B, T, D] with B, T = {b}, {t}, got shape {_sizes(cos)}")
        _require(sin.shape == cos.shape, lambda: f"{op}: sin {_sizes(sin)} must have cos' shape {_sizes(cos)}")
        head_dim = cos.shape[2]
        _require(head_dim >= 2 and head_dim % 2 == 0, lambda: f"{op}: head dim D = {head_dim} (cos last dim) must "
                 "be even and >= 2 for rotate-half RoPE")
    else:
        head_dim = out.shape[3]
        _require(head_dim >= 1, lambda: f"{op}: head dim D = 0 (out last dim); it must be >= 1")
    _require(c % head_dim == 0, lambda: f"{op}: C = {c} channels is not a multiple of the head dim D = {head_dim}")
    want = [b, c // head_dim, t, head_dim]
    _require(list(out.shape) == want, lambda: f"{op}: out must be [B, H, T, D] = {want}, got shape {_sizes(out)}")
    if hat_out is not None:
        _check_dtype(op, "hat_out", hat_out, torch.float32)
        _require(list(hat_out.shape) == [b, t, c],
                 lambda: f"{op}: hat_out must be [B, T, C] = {[b, t, c]}, got shape {_sizes(hat_out)}")
    named = [("codes", codes), ("scales", scales), ("grid", grid), ("signs", signs)]
    named += [(f"inputs[{i}]", x) for i, x in enumerate(inputs)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    named += [(n, v) for n, v in (("up", up), ("bias", bias), ("cos", cos), ("sin", sin), ("out", out),
                                  ("hat_out", hat_out)) if v is not None]
    _check_same_device(op, *named)


def _check_pack_args(codes: torch.Tensor, bits: int) -> None:
    op = "pack_bits"
    _check_at_least_1d(op, "codes", codes)
    _check_dtype(op, "codes", codes, torch.int32)
    _check_bits(op, bits)
    _require(codes.shape[-1] <= _MAX_COUNT,
             lambda: f"{op}: codes last dim {codes.shape[-1]} is too large (at most 2**58 codes per row)")


def _check_unpack_args(packed: torch.Tensor, bits: int, count: int) -> None:
    op = "unpack_bits"
    _check_at_least_1d(op, "packed", packed)
    _check_dtype(op, "packed", packed, torch.uint8)
    _check_bits(op, bits)
    _check_count(op, count)
    want = (count * bits + 7) // 8
    _require(packed.shape[-1] == want, lambda: f"{op}: packed last dim {packed.shape[-1]} must equal "
             f"ceil(count * bits / 8) = ceil({count} * {bits} / 8) = {want}")


# ---- fake kernels: the checks above, then shapes and dtypes (torch.compile / meta tensors) ---


@torch.library.register_fake("aquakv::hadamard")
def _hadamard_fake(x: torch.Tensor, signs: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    _check_hadamard_args(x, signs)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("aquakv::higgs_quantize")
def _higgs_quantize_fake(
    x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    group_bytes = _check_higgs_quantize_args(x, grid, signs, group_size)
    groups = x.shape[-1] // group_size
    lead = x.shape[:-1]
    codes = x.new_empty((*lead, groups * group_bytes), dtype=torch.uint8)
    scales = x.new_empty((*lead, groups), dtype=torch.float16)
    return codes, scales


@torch.library.register_fake("aquakv::higgs_quantize_scaled")
def _higgs_quantize_scaled_fake(x, scales, grid, signs, group_size: int) -> torch.Tensor:
    group_bytes = _check_higgs_quantize_scaled_args(x, scales, grid, signs, group_size)
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
    _check_higgs_dequantize_args(codes, scales, grid, signs, group_size, dtype)
    return scales.new_empty((*scales.shape[:-1], scales.shape[-1] * group_size), dtype=dtype)


@torch.library.register_fake("aquakv::pack_bits")
def _pack_bits_fake(codes: torch.Tensor, bits: int) -> torch.Tensor:
    _check_pack_args(codes, bits)
    count = codes.shape[-1]
    return codes.new_empty((*codes.shape[:-1], (count * bits + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("aquakv::unpack_bits")
def _unpack_bits_fake(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    _check_unpack_args(packed, bits, count)
    return packed.new_empty((*packed.shape[:-1], count), dtype=torch.int32)


@torch.library.register_fake("aquakv::aqua_reconstruct")
def _aqua_reconstruct_fake(codes, scales, grid, signs, group_size, inputs, weights, up, bias, cos, sin, out,
                           hat_out) -> None:
    _check_aqua_reconstruct_args(codes, scales, grid, signs, group_size, inputs, weights, up, bias, cos, sin, out,
                                 hat_out)


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


def _refuse_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: not differentiable (it produces integer codes; no backward is defined); "
                           "detach its inputs (.detach()) before calling it")

    return backward


def _no_setup(ctx, inputs, output) -> None:
    pass


torch.library.register_autograd("aquakv::hadamard", _hadamard_backward, setup_context=_hadamard_setup)
torch.library.register_autograd("aquakv::higgs_dequantize", _dequantize_backward, setup_context=_dequantize_setup)
for _op in ("higgs_quantize", "higgs_quantize_scaled", "pack_bits", "unpack_bits"):
    torch.library.register_autograd(f"aquakv::{_op}", _refuse_backward(_op), setup_context=_no_setup)
