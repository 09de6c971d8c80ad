"""HiggsQuantizer / QuantizedTensor edges: settings the ops refuse, empty inputs, fp16 scale range, views, dtypes."""
from __future__ import annotations

import pytest
import torch
from aquakv.grids import available_grids, get_grid
from aquakv.quantizer import (
    GridSpec,
    HiggsQuantizer,
    QuantizedTensor,
    check_group_size,
    random_signs,
)


def _op_accepts(group: int, dim: int, n: int) -> bool:
    try:
        torch.ops.aquakv.higgs_quantize(torch.ones(1, group), get_grid(dim, n), random_signs(group, 0), group)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("grid", available_grids())
def test_check_group_size_agrees_with_the_op(grid):
    spec = GridSpec(*grid)
    for group in (2, 4, 6, 8, 12, 16, 32, 48, 64, 96, 128, 1024, 32768, 65536):
        try:
            check_group_size(group, spec.dim, spec.code_bits, op="HiggsQuantizer")
            ours = True
        except ValueError as e:
            ours = False
            assert str(e).startswith("HiggsQuantizer: ") and f"group_size {group}" in str(e)
        assert ours == _op_accepts(group, *grid), (grid, group)


def test_quantizer_refuses_at_construction_what_the_op_refuses_at_quantize():
    # 3 bits, d = 2: 6-bit codes; a group of 4 holds 12 code bits, not whole bytes.
    with pytest.raises(ValueError, match="group_size 4 / d 2 \\* code_bits 6 = 12 bits of codes per group"):
        HiggsQuantizer(bits=3, dim=2, group_size=4)
    HiggsQuantizer(bits=3, dim=2, group_size=8)  # 24 bits: fine


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=True), "bits must be"), (dict(bits=float("nan")), "bits must be"), (dict(bits="2"), "bits must be"),
    (dict(dim=0), "dim must be"), (dict(dim=2.0), "dim must be"), (dict(group_size=64.0), "group_size 64.0"),
    (dict(group_size=2 ** 40), "group_size"), (dict(seed=-1), "seed"), (dict(seed=2 ** 63), "seed"),
    (dict(seed=1.5), "seed"),
])
def test_quantizer_refuses_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        HiggsQuantizer(**{"bits": 2, "dim": 2, "group_size": 64, "seed": 0, **kwargs})


def test_grid_spec_vocabulary():
    spec = GridSpec(4, 256)
    assert spec == (4, 256) and tuple(spec) == (4, 256)
    assert spec.bits == 2.0 and spec.code_bits == 8  # bits per value vs bits per 4-dim code
    q = HiggsQuantizer(bits=2, dim=4, group_size=64)
    assert q.settings.grid == spec and q.settings.bits == spec.bits and q.settings.code_bits == spec.code_bits


@pytest.mark.parametrize("shape", [(3, 0), (0, 70), (2, 0, 5), (0,), (4, 2, 0)])
def test_empty_inputs_round_trip(shape):
    q = HiggsQuantizer(bits=2, dim=2, group_size=64)
    x = torch.randn(shape)
    qt = q.quantize(x)
    assert qt.shape == x.shape and qt.numel == 0
    out = q.dequantize(qt)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_tiny_group_norms_are_refused_not_zeroed():
    q = HiggsQuantizer(bits=2, dim=2, group_size=64)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))  # seeded: the norm below is fixed
    x[2, 64:] *= 1e-8  # norm ~8e-8: an fp16 scale of 0 (or a few subnormal steps) would silently zero the group
    with pytest.raises(ValueError, match=r"group norm of [0-9.]+e-08 is below the smallest normal float16"):
        q.quantize(x)
    x[2, 64:] = 0  # an all-zero group is exact and fine
    q.quantize(x)


def test_normal_inputs_are_coded_exactly_as_the_op_codes_them():
    q = HiggsQuantizer(bits=2, dim=2, group_size=64, seed=3)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0)) * 1e-3  # small, but normal fp16 scales
    qt = q.quantize(x)
    codes, scales = torch.ops.aquakv.higgs_quantize(x, get_grid(2, 16), random_signs(64, 3), 64)
    assert torch.equal(qt.codes, codes) and torch.equal(qt.scales, scales) and qt.scales.dtype == torch.float16


def test_to_a_dtype_changes_only_the_logical_dtype():
    q = HiggsQuantizer(bits=2, dim=2, group_size=64)
    x = torch.randn(3, 100)
    qt = q.quantize(x)
    half = qt.to(torch.float16)
    assert half.dtype == torch.float16 and qt.dtype == torch.float32
    assert torch.equal(half.codes, qt.codes) and half.codes.dtype == torch.uint8
    assert torch.equal(half.scales, qt.scales) and half.scales.dtype == torch.float16
    out = q.dequantize(half)
    assert out.dtype == torch.float16
    # The op decodes in fp32 and rounds once: within half an fp16 ulp (2^-11 relative) of the fp32 decoding.
    torch.testing.assert_close(out.float(), q.dequantize(qt), rtol=2 ** -10, atol=1e-6)
    moved = qt.to("cpu", dtype=torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.device.type == "cpu"
    with pytest.raises(TypeError, match="logical dtype"):
        qt.to(torch.int8)
    with pytest.raises(TypeError, match="expected a device or a dtype"):
        qt.to(2.5)


def test_nbytes_counts_the_storages_held_once():
    q = HiggsQuantizer(bits=2, dim=2, group_size=64)
    qt = q.quantize(torch.randn(4, 128))
    assert qt.nbytes == qt.codes.numel() + 2 * qt.scales.numel()  # fresh tensors: storage = the tensors
    buffer = torch.zeros(1000, dtype=torch.uint8)  # codes and scales as views into one larger buffer
    codes = buffer[:128].view(4, 32)
    codes.copy_(qt.codes)
    scales = buffer[128:144].view(torch.float16).view(4, 2)
    scales.copy_(qt.scales)
    view = QuantizedTensor(codes, scales, qt.shape, qt.dtype, qt.settings)
    assert view.nbytes == 1000  # the buffer is what is held, and only once
    assert view.bits_per_value == qt.bits_per_value  # the format's own cost does not depend on where it lives
    assert torch.equal(q.dequantize(view), q.dequantize(qt))
