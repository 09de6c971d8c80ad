"""Input checks of the aquakv ops: csrc/checks.h item by item, in the same order and with the same messages, used
by the fake kernels in `aquakv.ops` (and by `check_group_size`, the one group-size rule of the package).
"""
from __future__ import annotations

import torch

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


class GroupSizeError(ValueError, RuntimeError):
    """A group size the kernels cannot use. A ValueError, as library callers report bad settings, and a
    RuntimeError, as the ops' own checks (TORCH_CHECK) fail: one rule, catchable either way."""


def check_group_size(group_size: int, dim: int, code_bits: int, *, op: str = "check_group_size") -> None:
    """The one group-size rule of HIGGS (csrc/checks.h check_group_size, same messages); raises GroupSizeError.

    group_size must be a power of two in 2..32768, a multiple of the grid dim `dim`, and its
    group_size/dim codes of `code_bits` bits each (code_bits = log2(grid points)) must fill whole
    bytes: (group_size / dim * code_bits) % 8 == 0, so every group's codes start on a byte boundary.
    `op` names the caller in the message.
    """
    try:
        _require(dim >= 1, lambda: f"{op}: grid dim d must be >= 1, got {dim}")
        _require(1 <= code_bits <= 8 or code_bits == 16,
                 lambda: f"{op}: code_bits must be in 1..8 or 16, got {code_bits}")
        _check_hadamard_size(op, "group_size", group_size)
        _require(group_size % dim == 0,
                 lambda: f"{op}: group_size {group_size} is not a multiple of the grid dim d = {dim}")
        per_group = group_size // dim * code_bits
        _require(per_group % 8 == 0, lambda: f"{op}: group_size {group_size} / d {dim} * code_bits {code_bits} = "
                 f"{per_group} bits of codes per group is not a multiple of 8; each group's codes must fill whole "
                 "bytes so groups stay byte-aligned")
    except RuntimeError as e:
        raise GroupSizeError(str(e)) from None


def check_hadamard_args(x: torch.Tensor, signs: torch.Tensor | None) -> None:
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


def check_higgs_quantize_args(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int) -> int:
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


def check_higgs_quantize_scaled_args(x, scales, grid, signs, group_size: int) -> int:
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


def check_higgs_dequantize_args(codes, scales, grid, signs, group_size: int, dtype: torch.dtype) -> None:
    op = "higgs_dequantize"
    _check_at_least_1d(op, "codes", codes)
    _check_at_least_1d(op, "scales", scales)
    _check_dtype(op, "codes", codes, torch.uint8)
    _check_dtype(op, "scales", scales, torch.float16)
    _check_float_dtype(op, "dtype", dtype)
    d, code_bits, group_bytes = _check_higgs_common(op, grid, signs, group_size)
    _check_codes_match_scales(op, codes, scales, group_size, d, code_bits, group_bytes)
    _check_same_device(op, ("codes", codes), ("scales", scales), ("grid", grid), ("signs", signs))


def check_higgs_linear_args(x, codes, scales, grid, signs, group_size: int, bias) -> int:
    """Returns out (codes' rows)."""
    op = "higgs_linear"
    _check_at_least_1d(op, "x", x)
    _check_float_dtype(op, "x", x.dtype)
    _require(codes.dim() == 2,
             lambda: f"{op}: codes must be 2-D [out, groups * bytes per group], got shape {_sizes(codes)}")
    _require(scales.dim() == 2, lambda: f"{op}: scales must be 2-D [out, groups], got shape {_sizes(scales)}")
    _check_dtype(op, "codes", codes, torch.uint8)
    _check_dtype(op, "scales", scales, torch.float16)
    d, code_bits, group_bytes = _check_higgs_common(op, grid, signs, group_size)
    _check_codes_match_scales(op, codes, scales, group_size, d, code_bits, group_bytes)
    groups, out = scales.shape[-1], scales.shape[0]
    _require(x.shape[-1] == groups * group_size,
             lambda: f"{op}: x last dim {x.shape[-1]} does not match the weight's in = {groups} groups (scales last "
             f"dim) * group_size {group_size} = {groups * group_size}")
    named = [("x", x), ("codes", codes), ("scales", scales), ("grid", grid), ("signs", signs)]
    if bias is not None:
        _require(bias.dtype == x.dtype, lambda: f"{op}: bias must be {x.dtype} like x, got {bias.dtype}")
        _require(bias.dim() == 1 and bias.shape[0] == out,
                 lambda: f"{op}: bias must be 1-D of length out = {out}, got shape {_sizes(bias)}")
        named.append(("bias", bias))
    _check_same_device(op, *named)
    return out


def _check_prediction_dtype(op: str, name: str, t: torch.Tensor, first: torch.Tensor) -> None:
    """The prediction's tensors (inputs, weights, up) share one dtype, float32 or bfloat16: inputs[0]'s."""
    want = first.dtype
    _require(want in (torch.float32, torch.bfloat16), lambda: f"{op}: inputs[0] must be torch.float32 or "
             f"torch.bfloat16 (the prediction's matmul dtype), got {want}")
    _require(t.dtype == want, lambda: f"{op}: {name} must be {want} like inputs[0] (inputs, weights and up share "
             f"the prediction's matmul dtype), got {t.dtype}")


def check_aqua_reconstruct_args(codes, scales, grid, signs, group_size: int, inputs, weights, up, bias, cos, sin,
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
        _check_prediction_dtype(op, f"inputs[{i}]", x, inputs[0])
        _require(x.dim() == 3 and x.shape[0] == b and x.shape[1] == t, lambda: f"{op}: inputs[{i}] must be "
                 f"[B, T, C_i] with B, T = {b}, {t} (scales' leading dims), got shape {_sizes(x)}")
        _check_prediction_dtype(op, f"weights[{i}]", w, inputs[0])
        _require(w.dim() == 3, lambda: f"{op}: weights[{i}] must be 3-D [G, C_i/G, M], got shape {_sizes(w)}")
        if i == 0:
            groups = w.shape[0]
            _require(groups >= 1, lambda: f"{op}: weights[0] has G = 0 groups; G must be >= 1")
            _require(c % groups == 0, lambda: f"{op}: C = {c} channels (scales last dim * group_size) is not a "
                     f"multiple of G = {groups} (weights' first dim)")
            if up is not None:
                _check_prediction_dtype(op, "up", up, inputs[0])
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


def check_pack_args(codes: torch.Tensor, bits: int) -> None:
    op = "pack_bits"
    _check_at_least_1d(op, "codes", codes)
    _check_dtype(op, "codes", codes, torch.int32)
    _check_bits(op, bits)
    _require(codes.shape[-1] <= _MAX_COUNT,
             lambda: f"{op}: codes last dim {codes.shape[-1]} is too large (at most 2**58 codes per row)")


def check_unpack_args(packed: torch.Tensor, bits: int, count: int) -> None:
    op = "unpack_bits"
    _check_at_least_1d(op, "packed", packed)
    _check_dtype(op, "packed", packed, torch.uint8)
    _check_bits(op, bits)
    _check_count(op, count)
    want = (count * bits + 7) // 8
    _require(packed.shape[-1] == want, lambda: f"{op}: packed last dim {packed.shape[-1]} must equal "
             f"ceil(count * bits / 8) = ceil({count} * {bits} / 8) = {want}")
