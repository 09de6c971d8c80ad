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
    (dict(grid=GRID[:12]), "higgs_quantize: grid has 12 points; it must have 2\\*\\*bits points"),
    (dict(grid=random_grid(512, 1, 0)), "grid has 512 points"),
    (dict(grid=GRID.reshape(-1)), "higgs_quantize: grid must be 2-D"),
    (dict(signs=SIGNS[:64]), "higgs_quantize: signs must be 1-D of length group_size = 128"),
    (dict(signs=SIGNS.double()), "higgs_quantize: signs must be torch.float32, got torch.float64"),
    (dict(group_size=96, signs=SIGNS[:96]), "higgs_quantize: group_size 96 must be a power of two"),
    (dict(group_size=65536), "group_size 65536 must be a power of two in 2..32768"),
    (dict(grid=random_grid(4, 8, 0), x=X[:, :16], signs=SIGNS[:16], group_size=16),
     "higgs_quantize: group_size 16 / d 8 \\* bits 2 = 4 code bits per group is not a multiple of 8"),
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


@pytest.mark.parametrize("override,message", BAD_DEQUANTIZE, ids=lambda v: v if isinstance(v, str) else None)
def test_dequantize_bad_inputs(override: dict, message: str) -> None:
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
    with pytest.raises(RuntimeError, match=message):
        ops.higgs_dequantize(**args)


@pytest.mark.parametrize(
    "x,signs,message",
    [
        (torch.ones(3, 12), None, "hadamard: last dim of x 12 must be a power of two in 2..32768"),
        (torch.ones(1, 65536), None, "hadamard: last dim of x 65536 must be a power of two"),
        (torch.ones(3, 1), None, "hadamard: last dim of x 1 must be a power of two in 2..32768"),
        (torch.ones(3, 8, dtype=torch.int32), None, "hadamard: x must be float32, float16 or bfloat16"),
        (torch.ones(3, 8), torch.ones(4), "hadamard: signs must be 1-D of length x.size\\(-1\\) = 8"),
        (torch.ones(3, 8), torch.ones(8, dtype=torch.float16), "hadamard: signs must be torch.float32, got torch.float16"),
    ],
)
def test_hadamard_bad_inputs(x: torch.Tensor, signs: torch.Tensor | None, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.hadamard(x, signs, 1.0)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: ops.pack_bits(torch.zeros(4, dtype=torch.int64), 4), "pack_bits: codes must be torch.int32, got torch.int64"),
        (lambda: ops.pack_bits(torch.zeros(4, dtype=torch.int32), 9), "pack_bits: bits must be in 1..8 or 16, got 9"),
        (lambda: ops.pack_bits(torch.zeros(4, dtype=torch.int32), 0), "pack_bits: bits must be in 1..8 or 16, got 0"),
        (lambda: ops.unpack_bits(torch.zeros(4, dtype=torch.uint8), 3, 11),
         "unpack_bits: packed last dim 4 must equal ceil\\(count \\* bits / 8\\) = ceil\\(11 \\* 3 / 8\\) = 5"),
        (lambda: ops.unpack_bits(torch.zeros(4, dtype=torch.int8), 8, 4), "unpack_bits: packed must be torch.uint8, got torch.int8"),
        (lambda: ops.unpack_bits(torch.zeros(0, dtype=torch.uint8), 8, -1), "unpack_bits: count must be >= 0"),
    ],
)
def test_bitpack_bad_inputs(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


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
