"""The one asymmetric min/max quantizer (aquakv.uniform) against the two formulas it replaced: KIVI's
quantize_uniform and RTN's rtn_quantize_dequantize, kept here as private references, bit for bit."""
import pytest
import torch
from aquakv.ops import pack_bits, unpack_bits
from aquakv.uniform import (
    dequantize_uniform,
    quantize_uniform,
    uniform_codes,
    uniform_decode,
)
from aquakv.weights.linear import flat_groups
from aquakv.weights.rtn import rtn_quantize_dequantize
from old_uniform import old_kivi_quantize


def _old_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """aquakv.weights.rtn.rtn_quantize_dequantize before the merge."""
    groups = flat_groups(weight.detach().float(), group_size)
    pad = groups.numel() - weight.numel()
    if pad:
        groups = groups.clone()
        groups[-1, group_size - pad:] = groups[-1, 0]
    levels = (1 << bits) - 1
    low = groups.amin(dim=1, keepdim=True).half().float()
    scale = ((groups.amax(dim=1, keepdim=True) - low) / levels).half().float()
    codes = torch.where(scale > 0, torch.round((groups - low) / scale.clamp_min(1e-30)), torch.zeros_like(groups))
    w_hat = low + codes.clamp(0, levels) * scale
    return w_hat.reshape(-1)[: weight.numel()].view(weight.shape).to(weight.dtype)


def _rows_with_edge_cases(seed: int, g: int = 32) -> torch.Tensor:
    """Gaussian rows of very different ranges and offsets, plus constant rows (0, 3, a value fp16 cannot hold
    exactly), a row whose range underflows fp16 (scale 0 without being constant) and a huge row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, g, generator=gen) * torch.rand(64, 1, generator=gen) * 10 + torch.randn(64, 1, generator=gen)
    x[0], x[1], x[2] = 0.0, 3.0, 3000.3
    x[3] = torch.arange(g) * 1e-10
    x[4] = torch.randn(g, generator=gen) * 2000
    return x


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_old_kivi_formula(bits, seed):
    x = _rows_with_edge_cases(seed)
    codes, scale, zero = uniform_codes(x, bits)
    old_codes, old_scale, old_zero = old_kivi_quantize(x, bits)
    assert torch.equal(scale, old_scale) and torch.equal(zero, old_zero)
    # Codes agree wherever the scale is non-zero; where it is 0 they do not matter (the old formula stored
    # round(x - min) there, the new one 0) and both decode to the row's fp16 minimum.
    live = (scale > 0).expand_as(codes)
    assert torch.equal(codes[live], old_codes.to(torch.int32)[live])
    assert not live[[0, 1, 3]].any() and (codes[[0, 1, 3]] == 0).all() and live[2].all()
    old_decoded = old_codes.float() * old_scale.float() + old_zero.float()
    assert torch.equal(uniform_decode(codes, scale, zero), old_decoded)
    assert torch.equal(dequantize_uniform(quantize_uniform(x, bits)), old_decoded)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 12, 16])
@pytest.mark.parametrize("shape,group", [((48, 64), 64), ((150,), 64), ((7, 33), 128), ((5, 40), 16)])
def test_rtn_matches_the_old_formula(bits, shape, group):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits + len(shape))) * 0.05
    w.view(-1)[:group] = 0.25  # a constant group
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        wd = w.to(dtype)
        assert torch.equal(rtn_quantize_dequantize(wd, bits, group), _old_rtn(wd, bits, group))


def test_constant_rows_decode_to_their_fp16_value_or_closer():
    x = torch.tensor([[3.0] * 8, [-0.125] * 8, [0.0] * 8, [3000.3] * 8])
    q = quantize_uniform(x, 2)
    x_hat = dequantize_uniform(q)
    # fp16-exact constants: scale 0, code 0, exact.
    assert torch.equal(x_hat[:3], x[:3]) and torch.equal(unpack_bits(q.codes[:3], 2, 8), torch.zeros(3, 8).int())
    # 3000.3 has fp16 minimum 3000: the row's range above that minimum (0.3) gets a step like any other row,
    # so it decodes closer to its value than the fp16 minimum would.
    assert ((x_hat[3] - x[3]).abs() < 0.3 * 2.0 ** -8).all()


def test_packed_codes_are_the_ops_layout():
    x = _rows_with_edge_cases(4, g=45)
    q = quantize_uniform(x, 4)
    codes, _, _ = uniform_codes(x, 4)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (64, 23)
    assert torch.equal(q.codes, pack_bits(codes, 4))
    assert q.nbytes == 64 * 23 + 2 * 64 * 2


def test_bad_bits_are_named():
    x = torch.randn(4, 8)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ValueError, match="uniform_codes: bits"):
            uniform_codes(x, bad)
    with pytest.raises(ValueError, match="quantize_uniform: bits"):
        quantize_uniform(x, 12)  # unpacked codes may have 12 bits, packed ones may not
