"""Bad inputs fail with messages that name the op and the argument; edge inputs behave as documented."""
from __future__ import annotations

import math

import aquakv.ops as ops
import pytest
import torch
from aquakv import reference as ref
from sweeps import devices, random_grid, random_values

GRID = random_grid(16, 2, seed=0)  # d = 2, 4 bits
SIGNS = torch.from_numpy(ref.random_signs(128, seed=0))
X = random_values((3, 256), torch.float32, seed=0)


def quantize(x=X, grid=GRID, signs=SIGNS, group_size=128):
    return ops.higgs_quantize(x, grid, signs, group_size)


def dequantize_args():
    codes, scales = quantize()
    return dict(codes=codes, scales=scales, grid=GRID, signs=SIGNS, group_size=128, dtype=torch.float32)


BAD_QUANTIZE = [
    # (kwargs override, message fragment)
    (dict(x=X[:, :192]), "higgs_quantize: last dim 192 is not a multiple of group_size 128"),
    (dict(x=X.double()), "higgs_quantize: x must be float32, float16 or bfloat16, got torch.float64"),
    (dict(x=torch.tensor(1.0)), "higgs_quantize: x must have at least 1 dim"),
    (dict(grid=GRID.half()), "higgs_quantize: grid must be torch.float32, got torch.float16"),
    (dict(grid=GRID[:12]), "higgs_quantize: grid has 12 points; it must have 2\\*\\*code_bits points"),
    (dict(grid=random_grid(512, 1, 0)), "grid has 512 points"),
    (dict(grid=GRID.reshape(-1)), "higgs_quantize: grid must be 2-D"),
    (dict(signs=SIGNS[:64]), "higgs_quantize: signs must be 1-D of length group_size = 128"),
    (dict(signs=SIGNS.double()), "higgs_quantize: signs must be torch.float32, got torch.float64"),
    (dict(group_size=96, signs=SIGNS[:96]), "higgs_quantize: group_size 96 must be a power of two"),
    (dict(group_size=65536), "group_size 65536 must be a power of two in 2..32768"),
    (dict(grid=random_grid(4, 8, 0), x=X[:, :16], signs=SIGNS[:16], group_size=16),
     "higgs_quantize: group_size 16 / d 8 \\* code_bits 2 = 4 bits of codes per group is not a multiple of 8"),
    (dict(grid=random_grid(16, 3, 0)), "higgs_quantize: group_size 128 is not a multiple of the grid dim d = 3"),
]


@pytest.mark.parametrize("override,message", BAD_QUANTIZE, ids=lambda v: v if isinstance(v, str) else None)
def test_quantize_bad_inputs(override: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        quantize(**override)


def test_quantize_device_mismatch_names_both() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device as the second device")
    with pytest.raises(RuntimeError, match="higgs_quantize: .* is on"):
        quantize(x=X.cuda())


BAD_DEQUANTIZE = [
    (dict(codes="int32"), "higgs_dequantize: codes must be torch.uint8, got torch.int32"),
    (dict(scales="float32"), "higgs_dequantize: scales must be torch.float16, got torch.float32"),
    (dict(dtype=torch.float64), "higgs_dequantize: dtype must be float32, float16 or bfloat16"),
    (dict(codes="drop_byte"), "higgs_dequantize: codes last dim 63 does not match 2 groups \\(scales last dim\\) \\* 32 bytes"),
    (dict(scales="drop_row"), "higgs_dequantize: codes .* and scales .* must have the same leading dims"),
    (dict(group_size=64), "higgs_dequantize: signs must be 1-D of length group_size = 64"),
]


def bad_dequantize_args(override: dict) -> dict:
    args = dequantize_args()
    for key, value in override.items():
        if value == "int32":
            args[key] = args[key].int()
        elif value == "float32":
            args[key] = args[key].float()
        elif value == "drop_byte":
            args[key] = args[key][:, :-1]
        elif value == "drop_row":
            args[key] = args[key][:-1]
        else:
            args[key] = value
    return args


@pytest.mark.parametrize("override,message", BAD_DEQUANTIZE, ids=lambda v: v if isinstance(v, str) else None)
def test_dequantize_bad_inputs(override: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.higgs_dequantize(**bad_dequantize_args(override))


BAD_HADAMARD = [
    (torch.ones(3, 12), None, "hadamard: last dim of x 12 must be a power of two in 2..32768"),
    (torch.ones(1, 65536), None, "hadamard: last dim of x 65536 must be a power of two"),
    (torch.ones(3, 1), None, "hadamard: last dim of x 1 must be a power of two in 2..32768"),
    (torch.ones(3, 8, dtype=torch.int32), None, "hadamard: x must be float32, float16 or bfloat16"),
    (torch.ones(3, 8), torch.ones(4), "hadamard: signs must be 1-D of length x.size\\(-1\\) = 8"),
    (torch.ones(3, 8), torch.ones(8, dtype=torch.float16), "hadamard: signs must be torch.float32, got torch.float16"),
]


@pytest.mark.parametrize("x,signs,message", BAD_HADAMARD)
def test_hadamard_bad_inputs(x: torch.Tensor, signs: torch.Tensor | None, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.hadamard(x, signs, 1.0)


BAD_BITPACK = [
    # (op, args, message fragment)
    (ops.pack_bits, (torch.zeros(4, dtype=torch.int64), 4), "pack_bits: codes must be torch.int32, got torch.int64"),
    (ops.pack_bits, (torch.zeros(4, dtype=torch.int32), 9), "pack_bits: bits must be in 1..8 or 16, got 9"),
    (ops.pack_bits, (torch.zeros(4, dtype=torch.int32), 0), "pack_bits: bits must be in 1..8 or 16, got 0"),
    (ops.unpack_bits, (torch.zeros(4, dtype=torch.uint8), 3, 11),
     "unpack_bits: packed last dim 4 must equal ceil\\(count \\* bits / 8\\) = ceil\\(11 \\* 3 / 8\\) = 5"),
    (ops.unpack_bits, (torch.zeros(4, dtype=torch.int8), 8, 4), "unpack_bits: packed must be torch.uint8, got torch.int8"),
    (ops.unpack_bits, (torch.zeros(0, dtype=torch.uint8), 8, -1), "unpack_bits: count must be >= 0"),
    # count * bits used to overflow int64 here (2**61 * 8 = 2**64 wraps to 0, so an empty row "matched")
    (ops.unpack_bits, (torch.zeros(1, 0, dtype=torch.uint8), 8, 2**61),
     "unpack_bits: count 2305843009213693952 is too large \\(at most 2\\*\\*58 codes per row\\)"),
    (ops.unpack_bits, (torch.zeros(0, 0, dtype=torch.uint8), 16, 2**62 + 1), "unpack_bits: count .* is too large"),
    (ops.unpack_bits, (torch.zeros(3, dtype=torch.uint8), 16, 2**63 - 1), "unpack_bits: count .* is too large"),
]


@pytest.mark.parametrize("op,args,message", BAD_BITPACK, ids=lambda v: v if isinstance(v, str) else None)
def test_bitpack_bad_inputs(op, args: tuple, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        op(*args)


def test_pack_rejects_a_huge_expanded_row() -> None:
    # An expanded view is a real CPU tensor of any length; its count * bits must not overflow either.
    codes = torch.zeros(1, dtype=torch.int32).expand(2**59)
    with pytest.raises(RuntimeError, match="pack_bits: codes last dim 576460752303423488 is too large"):
        ops.pack_bits(codes, 16)


# ---- fake (meta) kernels check exactly what the real ones check -----------------------------


def to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def bad_calls() -> list[tuple[str, object, dict]]:
    """(id, op, kwargs) of every bad call above, on CPU tensors."""
    calls = []
    for override, message in BAD_QUANTIZE:
        calls.append((message, ops.higgs_quantize, dict(x=X, grid=GRID, signs=SIGNS, group_size=128) | override))
    for override, message in BAD_DEQUANTIZE:
        calls.append((message, ops.higgs_dequantize, bad_dequantize_args(override)))
    for x, signs, message in BAD_HADAMARD:
        calls.append((message, ops.hadamard, dict(x=x, signs=signs, scale=1.0)))
    for op, args, message in BAD_BITPACK:
        names = ("codes", "bits") if op is ops.pack_bits else ("packed", "bits", "count")
        calls.append((message, op, dict(zip(names, args))))
    return calls


BAD_CALLS = bad_calls()


@pytest.mark.parametrize("op,kwargs", [c[1:] for c in BAD_CALLS], ids=[c[0][:60] for c in BAD_CALLS])
def test_fake_kernel_refuses_like_the_real_one(op, kwargs: dict) -> None:
    with pytest.raises(RuntimeError) as real:
        op(**kwargs)
    with pytest.raises(RuntimeError) as fake:
        op(**{k: to_meta(v) for k, v in kwargs.items()})
    assert str(fake.value) == str(real.value)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", sorted({str(t) for t in vars(torch).values() if isinstance(t, torch.dtype)}))
def test_dtype_names_match_torch_spelling(dtype: str) -> None:
    # Messages spell a dtype the way Python does (torch.uint16, torch.float8_e5m2), on both sides.
    t = getattr(torch, dtype.split(".")[1])
    if t in (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        pytest.skip("quantized tensors have their own backend")
    try:
        x = torch.empty(2, 8, dtype=t)
    except (RuntimeError, TypeError):
        pytest.skip(f"cannot allocate {dtype} on cpu")
    messages = []
    for device in ("cpu", "meta"):
        try:
            ops.hadamard(x.to(device))
            messages.append(None)
        except RuntimeError as e:
            messages.append(str(e))
    assert messages[0] == messages[1]
    if messages[0] is not None:
        assert messages[0].endswith(f"got {t}")


def mixed_device_calls() -> list[tuple[str, object, dict]]:
    """(argument put on meta, op, kwargs): valid CPU calls with one tensor moved to meta."""
    q = dict(x=X, grid=GRID, signs=SIGNS, group_size=128)
    dq = dequantize_args()
    calls = [(name, ops.higgs_quantize, q | {name: q[name].to("meta")}) for name in ("x", "grid", "signs")]
    calls += [(name, ops.higgs_dequantize, dq | {name: dq[name].to("meta")}) for name in ("codes", "scales", "grid",
                                                                                           "signs")]
    calls += [("signs", ops.hadamard, dict(x=X, signs=SIGNS.repeat(2).to("meta"), scale=1.0)),
              ("x", ops.hadamard, dict(x=X.to("meta"), signs=SIGNS.repeat(2), scale=1.0))]
    return calls


@pytest.mark.parametrize("name,op,kwargs", mixed_device_calls(), ids=lambda v: v if isinstance(v, str) else None)
def test_meta_mixed_with_cpu_raises_instead_of_returning_garbage(name: str, op, kwargs: dict) -> None:
    # Meta outranks CPU in dispatch, so the fake kernel runs: it used to return uninitialised CPU memory.
    with pytest.raises(RuntimeError, match=f"^{op.__name__}: .* is on (meta|cpu) but .* is on (cpu|meta); all "
                                            "tensors must be on the same device$") as failure:
        op(**kwargs)
    assert f"{name} is on meta" in str(failure.value) or f"but {name} is on meta" in str(failure.value)


@pytest.mark.parametrize(
    "group_size,d,code_bits",
    [(128, 2, 4), (96, 2, 4), (0, 1, 8), (1, 1, 8), (65536, 1, 8), (16, 8, 2), (128, 3, 4), (64, 4, 16), (8, 1, 1)],
)
def test_check_group_size_is_the_cpp_rule(group_size: int, d: int, code_bits: int) -> None:
    # The pure-Python rule (for callers that validate before any op runs) agrees with the C++ check.
    grid = random_grid(2**code_bits, d, seed=0)
    x = torch.zeros(1, 2 * max(group_size, 1))
    signs = torch.ones(max(group_size, 0))
    try:
        ops.higgs_quantize(x, grid, signs, group_size)
        real = None
    except RuntimeError as e:
        real = str(e)
    try:
        ops.check_group_size(group_size, d, code_bits, op="higgs_quantize")
        mine = None
    except RuntimeError as e:
        mine = str(e)
    assert mine == real


def test_check_group_size_default_names_itself() -> None:
    with pytest.raises(RuntimeError, match="^check_group_size: group_size 96 must be a power of two in 2..32768$"):
        ops.check_group_size(96, 2, 4)
    with pytest.raises(RuntimeError, match="^check_group_size: code_bits must be in 1..8 or 16, got 9$"):
        ops.check_group_size(128, 2, 9)
    ops.check_group_size(1024, 4, 16)  # valid: returns None


# ---- non-finite inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_non_finite_group_gets_non_finite_scale(device: str, bad: float, dtype: torch.dtype) -> None:
    x = random_values((3, 256), dtype, seed=1)
    x[1, 200] = bad  # poisons group 1 of row 1 only
    codes, scales = ops.higgs_quantize(x.to(device), GRID.to(device), SIGNS.to(device), 128)
    finite = torch.isfinite(scales.cpu())
    assert not finite[1, 1]
    finite[1, 1] = True
    assert finite.all(), "a non-finite value leaked into another group"
    clean, _ = ops.higgs_quantize(x[[0, 2]].to(device), GRID.to(device), SIGNS.to(device), 128)
    assert torch.equal(codes[[0, 2]], clean), "codes of clean rows changed"


def test_norm_beyond_fp16_range_gives_inf_scale() -> None:
    # Scales are fp16: a group norm over 65504 cannot be stored and reads back as inf (documented).
    x = torch.full((1, 128), 1e4)
    _, scales = quantize(x=x, signs=SIGNS, group_size=128)
    assert torch.isinf(scales).all()


# ---- empty and non-contiguous -----------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_rows_give_empty_outputs(device: str, lead: tuple[int, ...]) -> None:
    x = torch.empty((*lead, 256), device=device)
    codes, scales = ops.higgs_quantize(x, GRID.to(device), SIGNS.to(device), 128)
    assert codes.shape == (*lead, 64) and codes.dtype == torch.uint8
    assert scales.shape == (*lead, 2) and scales.dtype == torch.float16
    back = ops.higgs_dequantize(codes, scales, GRID.to(device), SIGNS.to(device), 128, torch.bfloat16)
    assert back.shape == (*lead, 256) and back.dtype == torch.bfloat16
    assert ops.hadamard(x, None, 1.0).shape == x.shape
    packed = ops.pack_bits(torch.empty((*lead, 9), dtype=torch.int32, device=device), 3)
    assert packed.shape == (*lead, 4)
    assert ops.unpack_bits(packed, 3, 9).shape == (*lead, 9)


@pytest.mark.parametrize("device", devices())
def test_zero_channels_and_zero_count(device: str) -> None:
    codes, scales = ops.higgs_quantize(torch.empty((3, 0), device=device), GRID.to(device), SIGNS.to(device), 128)
    assert codes.shape == (3, 0) and scales.shape == (3, 0)
    assert ops.higgs_dequantize(codes, scales, GRID.to(device), SIGNS.to(device), 128, torch.float16).shape == (3, 0)
    assert ops.pack_bits(torch.empty((3, 0), dtype=torch.int32, device=device), 5).shape == (3, 0)
    assert ops.unpack_bits(torch.empty((3, 0), dtype=torch.uint8, device=device), 5, 0).shape == (3, 0)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs_are_accepted(device: str) -> None:
    x = random_values((256, 5), torch.float16, seed=2).to(device).t()  # [5, 256], strided
    grid_t = GRID.t().contiguous().t().to(device)  # [16, 2] with transposed strides
    signs = torch.stack([SIGNS, SIGNS], dim=1)[:, 0].to(device)  # stride 2
    assert not (x.is_contiguous() or grid_t.is_contiguous() or signs.is_contiguous())
    got = ops.higgs_quantize(x, grid_t, signs, 128)
    want = ops.higgs_quantize(x.contiguous(), GRID.to(device), SIGNS.to(device), 128)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    codes_t = torch.stack([want[0], want[0]], dim=-1)[..., 0]
    back = ops.higgs_dequantize(codes_t, want[1], grid_t, signs, 128, torch.float32)
    assert torch.equal(back, ops.higgs_dequantize(want[0], want[1], GRID.to(device), SIGNS.to(device), 128,
                                                  torch.float32))
    bits = torch.randint(0, 8, (40, 3), dtype=torch.int32, device=device).t()
    assert torch.equal(ops.pack_bits(bits, 3), ops.pack_bits(bits.contiguous(), 3))
