"""KIVI-style uniform baseline: bit packing, error budgets, per-channel/per-token grouping, bytes accounting,
and the cache inside a model (generate, beam search, crop)."""
import math

import pytest
import torch
from aquakv.hf_compat import cache_kwargs
from aquakv.kv.baselines import (
    Fp16Cache,
    transformers_cache_backends,
    transformers_quantized_factory,
)
from aquakv.kv.cache_presets import KiviCache
from aquakv.kv.kivi import KiviCodec
from aquakv.ops import pack_bits, unpack_bits
from aquakv.uniform import UniformQuantized, dequantize_uniform, quantize_uniform
from old_uniform import old_kivi_quantize
from tiny_llama import make_tiny_llama, random_token_windows


def _old_pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """KIVI's plain-torch packing before it moved to the ops: code i of a row in byte i // (8 // bits) at bit
    offset (i % (8 // bits)) * bits."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def _old_unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :count]


def _old_quantize_uniform(x: torch.Tensor, bits: int) -> UniformQuantized:
    """KIVI's min/max quantizer before aquakv.uniform (codes of zero-scale rows differ; they decode the same)."""
    codes, scale, zero = old_kivi_quantize(x, bits)
    return UniformQuantized(_old_pack_codes(codes, bits), scale, zero, x.shape, bits)


def _old_dequantize_uniform(q: UniformQuantized, dtype: torch.dtype) -> torch.Tensor:
    codes = _old_unpack_codes(q.codes, q.bits, q.shape[-1]).float()
    return (codes * q.scale.float() + q.zero.float()).to(dtype)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 32, 99])
def test_pack_unpack_round_trip_is_exact_and_keeps_the_old_bytes(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (5, 7, n), generator=gen, dtype=torch.int32)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 7, math.ceil(n * bits / 8))
    assert torch.equal(packed, _old_pack_codes(codes.to(torch.uint8), bits))  # KIVI's stored bytes do not move
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_packing_layout_is_little_end_first():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.int32)
    # 2-bit codes c0..c3 -> c0 | c1 << 2 | c2 << 4 | c3 << 6; c4 starts the next byte.
    assert pack_bits(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_uniform_round_trip_within_half_a_step(bits, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=gen) * torch.rand(64, 1, generator=gen) * 10 + torch.randn(64, 1, generator=gen)
    q = quantize_uniform(x, bits)
    x_hat = dequantize_uniform(q, torch.float32)
    levels = (1 << bits) - 1
    step = q.scale.float()
    # Rounding to the nearest level costs at most step/2; the fp16 zero point (min rounded to fp16, relative error
    # <= 2^-11) and the fp16 step (times up to `levels` levels) shift the grid by at most these amounts.
    lo = x.amin(-1, keepdim=True)
    budget = step / 2 + lo.abs() * 2.0 ** -11 + levels * step * 2.0 ** -11 + 1e-6
    assert ((x - x_hat).abs() <= budget).all()
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32


def test_constant_rows_are_exact_and_finite():
    x = torch.full((4, 16), 3.0)
    x[1] = 0.0
    x_hat = dequantize_uniform(quantize_uniform(x, 2), torch.float32)
    assert torch.isfinite(x_hat).all()
    assert torch.equal(x_hat, x)


def _chunk(seed, b=2, h=3, t=128, d=64):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t, d, generator=gen)
    values = torch.randn(b, h, t, d, generator=gen)
    return keys, values


def _rel_mse(x, y):
    return float(((x - y) ** 2).sum() / (y ** 2).sum())


@pytest.mark.parametrize("seed", range(3))
def test_codec_error_budget_on_gaussian_states(seed):
    keys, values = _chunk(seed)
    errors = {}
    for bits in (2, 4):
        store, k_hat, v_hat = KiviCodec(bits).encode(1, keys, values, None)
        k_dec, v_dec = KiviCodec(bits).decode(1, store, None)
        assert torch.equal(k_dec, k_hat) and torch.equal(v_dec, v_hat)  # the decoder sees what the encoder saw
        errors[bits] = (_rel_mse(k_hat, keys), _rel_mse(v_hat, values))
    # Min/max over 32 Gaussian samples spans ~4 sigma: a step of 4/3 sigma at 2 bits (error variance step^2/12
    # ~ 0.15) and 4/15 sigma at 4 bits (~ 0.006). Budgets leave ~30% headroom.
    assert max(errors[2]) < 0.2
    assert max(errors[4]) < 0.008
    assert max(errors[4]) < min(errors[2]) / 10


def test_keys_are_grouped_per_channel_and_values_per_token():
    keys, values = _chunk(7)
    channel_offset = torch.linspace(-40, 40, 64)  # outlier channels, as real keys have
    token_scale = torch.logspace(-2, 2, 128).view(1, 1, 128, 1)  # tokens of very different norms
    k, v = keys + channel_offset, values * token_scale
    _, k_hat, v_hat = KiviCodec(4).encode(0, k, v, None)
    # Per-channel ranges ignore the channel offsets and per-token ranges ignore the token scales, so the error
    # stays at the 4-bit level of plain Gaussian data relative to the centred/unscaled states.
    assert _rel_mse(k_hat - channel_offset, keys) < 0.008
    assert float((((v_hat - v) / token_scale) ** 2).sum() / (values ** 2).sum()) < 0.008


@pytest.mark.parametrize("bits,group", [(2, 32), (4, 32), (2, 64)])
def test_bytes_are_codes_plus_fp16_scales_and_zeros(bits, group):
    b, h, t, d = 2, 3, 128, 64
    keys, values = _chunk(1, b, h, t, d)
    codec = KiviCodec(bits, group_size=group)
    store, _, _ = codec.encode(0, keys, values, None)
    n = b * h * t * d
    expected = 2 * (n * bits // 8 + 2 * 2 * n // group)  # keys and values: codes + (scale, zero) per group
    assert codec.nbytes(store) == expected
    assert 8 * codec.nbytes(store) / (2 * n) == bits + 32 / group
    assert codec.num_tokens(store) == t


def test_a_ragged_chunk_pads_the_last_key_group_and_counts_it():
    keys, values = _chunk(2, t=45)
    codec = KiviCodec(2)
    store, k_hat, v_hat = codec.encode(0, keys, values, None)
    assert k_hat.shape == keys.shape and v_hat.shape == values.shape
    assert _rel_mse(k_hat, keys) < 0.2
    b, h, t, d = keys.shape
    key_bytes = b * h * 64 * d * 2 // 8 + 2 * 2 * b * h * 2 * d  # 45 tokens -> 2 groups of 32 (padded)
    value_bytes = b * h * t * d * 2 // 8 + 2 * 2 * b * h * t * (d // 32)
    assert codec.nbytes(store) == key_bytes + value_bytes


def test_truncate_and_select_batch():
    keys, values = _chunk(3, t=96)
    codec = KiviCodec(4)
    first, k1, v1 = codec.encode(0, keys[:, :, :64], values[:, :, :64], None)
    second, k2, v2 = codec.encode(0, keys[:, :, 64:], values[:, :, 64:], None)
    store = codec.append(codec.append(None, first), second)
    k_all, v_all = codec.decode(0, store, None)
    assert torch.equal(k_all, torch.cat([k1, k2], dim=2))
    cut = codec.truncate(store, 64)
    assert codec.num_tokens(cut) == 64 and torch.equal(codec.decode(0, cut, None)[0], k1)
    part = codec.truncate(store, 80)  # cuts the second chunk: re-encoded from its reconstruction
    assert codec.num_tokens(part) == 80
    assert _rel_mse(codec.decode(0, part, None)[0][:, :, 64:], k2[:, :, :16]) < 0.008
    picked = codec.select_batch(store, torch.tensor([1, 1, 0]))
    k_p, v_p = codec.decode(0, picked, None)
    assert torch.equal(k_p, k_all[[1, 1, 0]]) and torch.equal(v_p, v_all[[1, 1, 0]])


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


def test_cache_in_the_model_reports_every_byte(model):
    ids = random_token_windows(1, 4 + 130 + 10, seed=5)[0][None]
    cache = KiviCache(model, bits=2, sinks=4, buffer=128)
    model(input_ids=ids[:, :134], **cache_kwargs(model, cache), use_cache=True)  # 4 sinks + 130 buffered -> flushed
    model(input_ids=ids[:, 134:], **cache_kwargs(model, cache), use_cache=True)  # 10 new tokens in the buffer
    cfg = model.config
    layers, c = cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim
    fp16 = layers * 2 * (4 + 10) * c * 2
    quant_keys = layers * (160 * c * 2 // 8 + 2 * 2 * 5 * c)  # 130 tokens -> 5 key groups of 32
    quant_values = layers * (130 * c * 2 // 8 + 2 * 2 * 130 * (c // 16))  # head_dim 16 caps the value group
    assert cache.get_seq_length() == 144
    assert cache.nbytes() == fp16 + quant_keys + quant_values
    assert cache.bits_per_value() == pytest.approx(8 * (quant_keys + quant_values) / (layers * 2 * 130 * c))


def test_generate_greedy_and_beam_search(model):
    prompt = random_token_windows(2, 40, seed=6)
    ids = torch.stack(prompt)
    out = model.generate(input_ids=ids, **cache_kwargs(model, KiviCache(model, bits=4, buffer=16)), max_new_tokens=24,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 64)
    beams = model.generate(input_ids=ids[:1], **cache_kwargs(model, KiviCache(model, bits=4, buffer=16)),
                           max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 52)


@torch.no_grad()
def test_four_bits_track_the_fp16_logits_closer_than_two(model):
    ids = random_token_windows(1, 96, seed=8)[0][None]

    def stepped_logits(cache):
        return torch.cat([model(input_ids=ids[:, s:s + 32], **cache_kwargs(model, cache), use_cache=True).logits
                          for s in range(0, 96, 32)], dim=1)

    reference = stepped_logits(Fp16Cache(model))  # KiviCache keeps unquantized tokens in fp16 too
    errors = {}
    for bits in (2, 4):
        logits = stepped_logits(KiviCache(model, bits=bits, sinks=0, buffer=32))
        # The first step saw only its own fp16 states, exactly as with Fp16Cache (same values, same ops).
        assert torch.allclose(logits[:, :32], reference[:, :32], atol=1e-5)
        errors[bits] = float((logits - reference)[:, 32:].pow(2).mean())
    assert 0 < errors[4] < errors[2] / 4


@pytest.mark.parametrize("bits,pre_rope", [(2, False), (4, True), (1, False), (8, False)])
@torch.no_grad()
def test_logits_are_bit_identical_to_the_old_quantizer(model, monkeypatch, bits, pre_rope):
    """aquakv.uniform + the packing ops replace KIVI's own formulas without moving a single logit."""
    ids = random_token_windows(2, 70, seed=12)
    ids = torch.stack(ids)

    def stepped_logits():
        cache = KiviCache(model, bits=bits, sinks=4, buffer=16, group_size=8, pre_rope=pre_rope)
        return torch.cat([model(input_ids=ids[:, s:e], **cache_kwargs(model, cache), use_cache=True).logits
                          for s, e in ((0, 21), (21, 22), (22, 40), (40, 70))], dim=1)

    new = stepped_logits()
    monkeypatch.setattr("aquakv.kv.kivi.quantize_uniform", _old_quantize_uniform)
    monkeypatch.setattr("aquakv.kv.kivi.dequantize_uniform", _old_dequantize_uniform)
    old = stepped_logits()
    assert torch.equal(new, old)


def test_bad_settings_are_named(model):
    with pytest.raises(ValueError, match="bits"):
        KiviCache(model, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        KiviCodec(2, group_size=0)


def test_transformers_fp8_cache_reports_its_bytes(model):
    assert transformers_cache_backends()["fp8"] is None
    cache = transformers_quantized_factory("fp8")(model)
    ids = random_token_windows(1, 40, seed=9)[0][None]
    model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    assert 8.0 <= cache.bits_per_value() < 8.1  # one byte per value plus a per-tensor fp32 scale
    with pytest.raises(RuntimeError, match="unavailable"):
        transformers_quantized_factory("no-such-backend")
