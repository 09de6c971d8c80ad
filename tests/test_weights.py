"""HiggsLinear, quantize_model, save/load and the RTN baseline (quantize-weights: tests/test_weights_cli.py)."""
from __future__ import annotations

import json

import pytest
import torch
from aquakv.quantizer import HiggsQuantizer
from aquakv.weights import (
    HiggsLinear,
    average_bits,
    default_grid,
    load_quantized,
    quantize_model,
    rtn_bits_per_weight,
    rtn_quantize_dequantize,
    save_quantized,
)
from tiny_llama import make_tiny_llama, random_token_windows
from aquakv.weights.linear import higgs_weight_cost, row_group_size
from torch import nn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _linear(out_features: int, in_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():  # heavy-tailed rows of unequal scale: what the Hadamard rotation is for
        linear.weight.copy_(torch.distributions.StudentT(3.0).sample(linear.weight.shape) * torch.rand(out_features, 1))
    return linear


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,group,grid,bias", [
    ((64, 512), 256, (2, 256), True),
    ((10, 96), 64, (2, 64), False),  # 96 % 64 != 0: row-aligned groups of 32 (row_group_size)
    ((7, 100), 64, (2, 16), True),  # 100 has no power-of-two divisor >= 32: each row padded to 128
    ((33, 128), 128, (1, 256), False),
])
def test_forward_equals_dequantized_weight_matmul(device, shape, group, grid, bias):
    linear = _linear(*shape, bias=bias, seed=sum(shape)).to(device)
    q = HiggsLinear.from_linear(linear, dim=grid[0], n_points=grid[1], group_size=group, seed=3)
    x = torch.randn(2, 5, shape[1], device=device)
    # The weight the layer serves, decoded independently through the quantizer on its row-aligned groups.
    group_used, padded = row_group_size(shape[1], group, *grid)
    assert q.group_size == group_used and q.in_padded == padded
    w_hat = q.quantizer.dequantize(q.quantized_tensor()).reshape(shape[0], padded)[:, : shape[1]]
    expected = x @ w_hat.T + (linear.bias if bias else 0)
    # Same fp32 weight; only the matmul kernel's summation order may differ: a few ulps of |x| |W| sums.
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5 * float(x.abs().max() * w_hat.abs().sum(1).max()))
    w = linear.weight.detach()
    rel = float((w - w_hat).pow(2).sum() / w.pow(2).sum())
    # Relative error ~ the grid's Gaussian MSE (0.108 / 0.0297 / 0.0078 / 4e-5); the rotation makes that hold
    # even for these Student-t rows. Up to 1.5x for small groups and fp16 scales, and never below half.
    mse = {(2, 16): 0.1077, (2, 64): 0.0297, (2, 256): 0.00775, (1, 256): 4.1e-5}[grid]
    assert 0.5 * mse < rel < 1.5 * mse
    assert q.bits_per_weight == pytest.approx((shape[0] * padded // group_used) * (group_used * torch.log2(
        torch.tensor(float(grid[1]))).item() / grid[0] + 16) / (shape[0] * shape[1]))
    assert q.weight_bits == higgs_weight_cost(shape[0] * shape[1], *grid, group, in_features=shape[1])


def test_groups_are_rows_when_in_features_divides():
    linear = _linear(6, 512, bias=False, seed=0)
    q = HiggsLinear.from_linear(linear, bits=3, dim=2, group_size=256, seed=1)
    per_row = HiggsQuantizer(bits=3, dim=2, group_size=256, seed=1).quantize(linear.weight.detach())
    # Flattened groups of 256 are exactly the row halves: identical bytes to quantizing row by row.
    assert torch.equal(q.codes.reshape(6, -1), per_row.codes)
    assert torch.equal(q.scales.reshape(6, -1), per_row.scales)


def test_cast_keeps_scales_exact_and_follows_dtype():
    q = HiggsLinear.from_linear(_linear(16, 256, bias=True, seed=1), bits=4, dim=2, group_size=128, cache_weight=True)
    codes, scales = q.codes.clone(), q.scales.clone()
    x = torch.randn(3, 256)
    y32 = q(x)
    assert q._cached is None, "forward serves from the codes and holds no float weight"
    q.dequantize_weight()
    assert q._cached is not None
    q.to(torch.bfloat16)
    assert q._cached is None, "a cast must drop the cached fp32 weight"
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, scales) and torch.equal(q.codes, codes)
    y16 = q(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: outputs agree to ~2^-8 of their scale.
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2 * float(y32.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_moves_to_cuda_and_back():
    q = HiggsLinear.from_linear(_linear(16, 256, bias=True, seed=2), bits=2, dim=2, group_size=256)
    x = torch.randn(4, 256)
    y = q(x)
    q.cuda()
    assert q.codes.is_cuda and q.scales.is_cuda and q.bias.is_cuda
    torch.testing.assert_close(q(x.cuda()).cpu(), y, rtol=1e-5, atol=1e-5)  # same codes; kernels may reassociate
    assert q.cpu().codes.device.type == "cpu"


def test_from_linear_argument_errors():
    linear = _linear(4, 64, bias=False, seed=0)
    with pytest.raises(ValueError, match="exactly one of bits= or n_points="):
        HiggsLinear.from_linear(linear)
    with pytest.raises(ValueError, match="not an integer"):
        HiggsLinear.from_linear(linear, bits=2.25, dim=2, group_size=64)


def _quantized_tiny(seed: int = 0, **overrides):
    model = make_tiny_llama(seed=seed, **overrides)
    plan = {}
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            plan[name] = [(2, 16), (2, 64), (2, 256)][i % 3]
    return quantize_model(model, grid_per_layer=plan, group_size=64, seed=7, progress=False), plan


def test_quantize_model_skips_embeddings_and_head():
    model = make_tiny_llama(seed=1)
    embedding = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, bits=4, progress=False)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert sum(k is HiggsLinear for k in kinds.values()) == 28  # 4 blocks x 7 linears
    assert kinds["lm_head"] is nn.Linear and kinds["model.embed_tokens"] is nn.Embedding
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    # Row-aligned groups: in = 64 or 128 < 256, so each row is one group with one fp16 scale.
    layers = [m for m in model.modules() if isinstance(m, HiggsLinear)]
    numel = sum(m.in_features * m.out_features for m in layers)
    assert average_bits(model) == pytest.approx(sum(m.out_features * (4 * m.in_features + 16) for m in layers) / numel)


def test_quantize_model_head_of_tied_model_leaves_embedding_alone():
    model = make_tiny_llama(seed=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, bits=3, include_lm_head=True, progress=False)
    assert isinstance(model.lm_head, HiggsLinear)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_quantize_model_argument_errors():
    model = make_tiny_llama(seed=1)
    with pytest.raises(ValueError, match="exactly one of bits= or grid_per_layer="):
        quantize_model(model)
    with pytest.raises(ValueError, match="not quantizable linears"):
        quantize_model(model, grid_per_layer={"model.embed_tokens": (2, 16)})
    with pytest.raises(ValueError, match="no shipped grid gives bits=5.5"):
        default_grid(5.5)


def test_quantized_model_logits_approach_the_original_with_more_bits():
    ids = torch.stack(random_token_windows(2, 32, seed=1))
    with torch.no_grad():
        reference = make_tiny_llama(seed=4, initializer_range=0.05)(ids).logits
        errors = []
        for bits in (2, 3, 4, 8):
            model = quantize_model(make_tiny_llama(seed=4, initializer_range=0.05), bits=bits, group_size=64,
                                   progress=False)
            errors.append(float((model(ids).logits - reference).norm() / reference.norm()))
    # Weight error falls ~4x per bit (0.108, 0.030, 0.0078, 4e-5), so the logits must move less with every
    # bit. At 8 bits each of the 28 layers is off by sqrt(4e-5) = 0.6%, which this random net amplifies to
    # ~1.7% in the logits (measured); even 2 bits moves them by 73%, so 5% catches a broken layout or seed.
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 0.05


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, plan = _quantized_tiny(seed=2)
    save_quantized(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "higgs_weights.json").read_text())
    assert set(meta["layers"]) == set(plan)
    name = "model.layers.1.mlp.up_proj"
    assert (meta["layers"][name]["dim"], meta["layers"][name]["n_points"]) == plan[name]
    assert meta["layers"][name]["group_size"] == 64 and meta["layers"][name]["seed"] == 7

    fresh = load_quantized(make_tiny_llama(seed=2), tmp_path / "q")
    saved = dict(model.named_modules())
    for n, m in fresh.named_modules():
        if isinstance(m, HiggsLinear):
            assert torch.equal(m.codes, saved[n].codes) and torch.equal(m.scales, saved[n].scales)
            assert (m.dim, m.n_points, m.group_size, m.seed) == (saved[n].dim, saved[n].n_points, 64, 7)
    ids = torch.stack(random_token_windows(2, 16, seed=0))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="higgs_weights.json not found"):
        load_quantized(make_tiny_llama(), tmp_path)
    model, _ = _quantized_tiny()
    save_quantized(model, tmp_path / "q")
    with pytest.raises(ValueError, match=r"q_proj' is \[64, 96\] in the model but \[64, 64\]"):
        load_quantized(make_tiny_llama(hidden_size=96), tmp_path / "q")
    with pytest.raises(ValueError, match="no HiggsLinear layer"):
        save_quantized(make_tiny_llama(), tmp_path / "empty")


@pytest.mark.parametrize("dist", ["normal", "student"])
def test_rtn_error_decreases_with_bits(dist):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=gen)
    if dist == "student":
        w = w / torch.rand(64, 300, generator=gen).clamp_min(0.05).sqrt()
    errors = [float((rtn_quantize_dequantize(w, b, 128) - w).pow(2).sum() / w.pow(2).sum()) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # Uniform steps: each bit halves the step, so the error falls ~4x (3x..5x allowing for clipping/rounding
    # of min/max to fp16) once the grid is fine (>= 3 bits).
    for a, b in zip(errors[2:], errors[3:]):
        assert 3.0 < a / b < 5.0
    assert rtn_bits_per_weight(4, 128) == 4.25


def test_rtn_handles_constant_groups_and_padding():
    w = torch.full((3, 50), 0.75)
    w[2, 28:] = torch.linspace(0.5, 1.0, 22)
    w_hat = rtn_quantize_dequantize(w, 2, 64)  # 150 values: groups of 64, 64 and a padded tail of 22
    assert w_hat.shape == w.shape
    assert torch.equal(w_hat[0], w[0])  # a constant group decodes exactly
    # The tail group spans [0.5, 1]: 3 steps of 1/6, error <= 1/12 (+ fp16 rounding of min and step).
    # Zero padding would stretch its range to [0, 1] and allow errors up to 1/6.
    assert float((w_hat[2, 28:] - w[2, 28:]).abs().max()) <= 1 / 12 + 1e-3
