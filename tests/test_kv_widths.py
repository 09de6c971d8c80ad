"""KV widths per layer and per K/V (LayerWidthSettings, format_version 4): the codec, the fused op, the cache and the
predictors file serve them; a bad allocation is refused on load naming the field; uniform files stay as they were."""
import json

import pytest
import torch
from aquakv.hf_compat import cache_kwargs
from aquakv.kv.aqua_codec import AquaKVCodec
from aquakv.kv.cache_presets import AquaKVCache
from aquakv.kv.calibration import calibrate
from aquakv.kv.predictor_settings import AquaKVSettings, LayerWidthSettings, with_widths
from aquakv.kv.predictors import AquaKVPredictors
from tiny_llama import make_tiny_llama, random_token_windows

KEY_BITS = (None, 1.0, 3.0, 4.0)  # the tiny Llama: 4 layers, C = 32, head_dim 16 (group 16)
VALUE_BITS = (None, 4.0, 2.0, 1.0)
STEPS = [40, 1, 30, 7, 50, 1]  # flushes by prefill and by decode, quantized tokens at every later step
# Logits of this model have std ~0.2: the fused op and the composed path differ by float order only.
TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(initializer_range=0.02)


@pytest.fixture(scope="module")
def uniform(model):
    return calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False)


@pytest.fixture(scope="module")
def mixed(uniform):
    settings = with_widths(uniform.settings, KEY_BITS, VALUE_BITS)
    return AquaKVPredictors(uniform.key_maps, uniform.value_maps, settings, uniform.model_info, uniform.report,
                            uniform.calibration)


def _feed(model, ids, cache):
    out = []
    start = 0
    for n in STEPS:
        out.append(model(input_ids=ids[:, start:start + n], use_cache=True, **cache_kwargs(model, cache)).logits)
        start += n
    return torch.cat(out, 1)


def test_each_part_is_coded_at_its_own_width(mixed):
    codec = AquaKVCodec(mixed)
    x = torch.randn(1, 2, 5, 16)
    for layer in range(1, 4):
        store, _, _ = codec.encode(layer, x, 2 * x, (x, x))
        # codes per token: C / d values pairs of log2(n) bits = 32 / 2 * (2 * bits) / 8 bytes
        assert store.keys.codes.shape[-1] == 32 // 2 * round(2 * KEY_BITS[layer]) // 8
        assert store.values.codes.shape[-1] == 32 // 2 * round(2 * VALUE_BITS[layer]) // 8
    assert mixed.quantizer(0, "keys").settings.bits == 4 == mixed.quantizer(0, "values").settings.bits  # layer0_bits
    # compressed part: codes + 1 bit of scales (16 / 16) per value, layer 0 at 4 bits, averaged over K and V
    expected = (5 + sum(k + v + 2 for k, v in zip(KEY_BITS[1:], VALUE_BITS[1:])) / 2) / 4
    assert mixed.bits_per_value() == pytest.approx(expected)


def test_fused_decode_of_mixed_widths_equals_the_composed_path(mixed):
    """One aqua_reconstruct per part, each with its own grid, against dequantize + predict + add."""
    codec = AquaKVCodec(mixed)
    gen = torch.Generator().manual_seed(0)
    prev = (torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen))
    keys, values = torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    for layer in range(1, 4):
        store, k_hat, v_hat = codec.encode(layer, keys, values, prev)
        got = codec.decode(layer, store, prev)
        torch.testing.assert_close(got[0], k_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], v_hat, rtol=1e-5, atol=1e-5)


def test_cache_serves_mixed_widths_through_the_fused_op(model, mixed, monkeypatch):
    from aquakv import ops

    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    calls = []
    fused = ops.aqua_reconstruct
    monkeypatch.setattr(ops, "aqua_reconstruct", lambda *a, **k: calls.append(a[2].shape[0]) or fused(*a, **k))
    got = _feed(model, ids, AquaKVCache(model, mixed, buffer=16))
    assert {4, 16, 64, 256} <= set(calls)  # grids of 1, 2, 3 and 4 bits (n points) all reached the op
    monkeypatch.setattr(AquaKVCodec, "fused", False)
    ref = _feed(model, ids, AquaKVCache(model, mixed, buffer=16))
    # The two routes feed the next layer chains that differ by float order, and a chain one ulp away can flip a code
    # or an fp16 scale at a near-tie (measured here: 1 code and 3 scales of ~24k, which moved 0.3% of the logits by
    # up to 5e-4). Exact equality of the decode itself, store by store, is the test above.
    close = torch.isclose(got, ref, **TOL)
    assert close.float().mean() > 0.98, f"{(~close).sum()} of {close.numel()} logits differ"
    uniform_logits = _feed(model, ids, AquaKVCache(model, AquaKVPredictors(
        mixed.key_maps, mixed.value_maps, AquaKVSettings(2, 2, 16, 0, 4), mixed.model_info), buffer=16))
    assert not torch.equal(got, uniform_logits)  # the widths are really used


def test_uniform_widths_collapse_to_uniform_settings(uniform):
    s = with_widths(uniform.settings, (None, 2.0, 2, 2), (None, 2, 2, 2.0))
    assert type(s) is AquaKVSettings and s == uniform.settings and not s.mixed


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["aquakv"]), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path, edit):
    from safetensors.torch import save_file

    meta, tensors = _header(path)
    edit(meta)
    save_file(tensors, str(path), metadata={"aquakv": json.dumps(meta)})
    return path


def test_mixed_file_round_trip_is_version_4(mixed, uniform, tmp_path):
    mixed.save(tmp_path / "m.safetensors")
    meta, _ = _header(tmp_path / "m.safetensors")
    assert meta["format_version"] == 4
    assert meta["settings"]["key_bits"] == [None, 1, 3, 4] and meta["settings"]["value_bits"] == [None, 4, 2, 1]
    loaded = AquaKVPredictors.load(tmp_path / "m.safetensors")
    assert isinstance(loaded.settings, LayerWidthSettings) and loaded.settings == mixed.settings
    assert loaded.bits_per_value() == mixed.bits_per_value()
    uniform.save(tmp_path / "u.safetensors")  # no widths: the version and the settings of before
    meta, _ = _header(tmp_path / "u.safetensors")
    assert meta["format_version"] == 1 and set(meta["settings"]) == {"bits", "grid_dim", "group_size", "seed",
                                                                      "layer0_bits"}
    assert AquaKVPredictors.load(tmp_path / "u.safetensors").settings == uniform.settings


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["settings"].update(key_bits=[None, 2, 2]), r"settings\.key_bits: 3 entries for 4 layers"),
    (lambda m: m["settings"].update(value_bits=[None, 2, 2.7, 2]), r"settings\.value_bits\[2\]: 2\.7 bits: no shipped grid"),
    (lambda m: m["settings"].update(key_bits=[None, 2, 9, 2]), r"settings\.key_bits\[2\]: 9 bits: no shipped grid"),
    (lambda m: m["settings"].update(key_bits=[None, float("nan"), 2, 2]), r"settings\.key_bits\[1\]: must be a finite"),
    (lambda m: m["settings"].update(key_bits=[None, float("inf"), 2, 2]), r"settings\.key_bits\[1\]: must be a finite"),
    (lambda m: m["settings"].update(key_bits=[None, "2", 2, 2]), r"settings\.key_bits\[1\]: must be a finite"),
    (lambda m: m["settings"].update(key_bits=[2, 2, 2, 2]), r"settings\.key_bits\[0\]: must be null: layer 0 is the chain"),
    (lambda m: m["settings"].update(key_bits=[None, None, 2, 2]), r"settings\.key_bits\[1\]: must be a finite"),
    (lambda m: m["settings"].update(key_bits="2"), r"settings\.key_bits: must be a list"),
    (lambda m: m["settings"].pop("value_bits"), r"settings\.value_bits: 0 entries for 4 layers"),
    (lambda m: m.update(format_version=3), r"settings\.key_bits: per-layer widths need format_version 4"),
])
def test_bad_allocation_is_refused_naming_the_field(mixed, tmp_path, edit, field):
    path = _rewrite(mixed.save(tmp_path / "m.safetensors") or tmp_path / "m.safetensors", edit)
    with pytest.raises(ValueError, match=field):
        AquaKVPredictors.load(path)


def test_files_of_every_older_version_still_load(uniform, tmp_path):
    path = tmp_path / "u.safetensors"
    uniform.save(path)
    for version in (1, 2, 3):  # a uniform dense file is valid under each older version number
        _rewrite(path, lambda m: m.update(format_version=version))
        assert AquaKVPredictors.load(path).settings == uniform.settings
