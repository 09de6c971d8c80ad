"""AquaKVPredictors: affine maps, save/load round trip, compatibility errors, the HIGGS-only variant."""
import json

import pytest
import torch
from aquakv.kv.predictors import AffineMap, AquaKVPredictors, AquaKVSettings
from tiny_llama import make_tiny_llama


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def _random_predictors(model, rank: int | None = None, seed: int = 0) -> AquaKVPredictors:
    gen = torch.Generator().manual_seed(seed)
    info = AquaKVPredictors.model_info_of(model)
    c = info["kv_width"]

    def amap(c_in: int) -> AffineMap:
        bias = torch.randn(c, generator=gen)
        if rank is None:
            return AffineMap(bias=bias, weight=torch.randn(c_in, c, generator=gen))
        return AffineMap(bias=bias, down=torch.randn(c_in, rank, generator=gen), up=torch.randn(rank, c, generator=gen))

    n = info["num_layers"]
    keys = [AffineMap(bias=torch.randn(c, generator=gen))] + [amap(c) for _ in range(n - 1)]
    values = [AffineMap(bias=torch.randn(c, generator=gen))] + [amap(2 * c) for _ in range(n - 1)]
    settings = AquaKVSettings(bits=2, grid_dim=2, group_size=16, seed=3, layer0_bits=4)
    return AquaKVPredictors(keys, values, settings, info, report=[{"layer": 0, "x": 0.5}], calibration={"windows": 2})


def test_affine_map_of_split_inputs_equals_map_of_concatenation():
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(12, 5, generator=gen), torch.randn(5, generator=gen)
    x1, x2 = torch.randn(3, 7, 4, generator=gen), torch.randn(3, 7, 8, generator=gen)
    expected = torch.cat([x1, x2], -1) @ w + b
    # fp32 matmuls of width 12: a few ulps of values of size ~5
    torch.testing.assert_close(AffineMap(bias=b, weight=w)(x1, x2), expected, rtol=1e-5, atol=1e-5)
    down, up = torch.randn(12, 2, generator=gen), torch.randn(2, 5, generator=gen)
    torch.testing.assert_close(AffineMap(bias=b, down=down, up=up)(x1, x2), torch.cat([x1, x2], -1) @ down @ up + b,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not add up"):
        AffineMap(bias=b, weight=w)(x1)


@pytest.mark.parametrize("rank", [None, 3])
def test_save_load_round_trip_is_exact(model, tmp_path, rank):
    preds = _random_predictors(model, rank)
    path = tmp_path / "p.safetensors"
    preds.save(path)
    loaded = AquaKVPredictors.load(path)
    assert loaded.settings == preds.settings
    assert loaded.model_info == preds.model_info
    assert loaded.report == preds.report and loaded.calibration == preds.calibration
    x = torch.randn(5, preds.kv_width)
    for layer in range(preds.num_layers):
        for a, b in ((preds.key_maps[layer], loaded.key_maps[layer]), (preds.value_maps[layer], loaded.value_maps[layer])):
            assert a.tensors().keys() == b.tensors().keys()
            for name, t in a.tensors().items():
                assert torch.equal(t, b.tensors()[name]), (layer, name)
        k = preds.predict_keys(layer, x, like=x)
        assert torch.equal(k, loaded.predict_keys(layer, x, like=x))
        assert torch.equal(preds.predict_values(layer, k, x), loaded.predict_values(layer, k, x))
    # the metadata is plain JSON in the safetensors header (readable without this library)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["aquakv"])
    assert meta["model"]["kv_width"] == 32 and meta["settings"]["layer0_bits"] == 4


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="without aquakv metadata"):
        AquaKVPredictors.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        AquaKVPredictors.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("override, names", [
    (dict(num_hidden_layers=3), ["num_layers"]),
    (dict(num_key_value_heads=1), ["num_kv_heads", "kv_width"]),
    (dict(head_dim=8), ["head_dim", "kv_width"]),
])
def test_check_compatible_names_what_differs(model, override, names):
    preds = _random_predictors(model)
    other = make_tiny_llama(**override)
    with pytest.raises(ValueError) as err:
        preds.check_compatible(other)
    for name in names:
        assert name in str(err.value)
    preds.check_compatible(model)  # and the right model passes


def test_zeros_predicts_nothing_and_counts_bits(model):
    preds = AquaKVPredictors.zeros(model, bits=2)
    assert not preds.has_adapters
    x = torch.randn(4, preds.kv_width)
    assert all(preds.predict_keys(layer, x, like=x) is None for layer in range(preds.num_layers))
    assert preds.settings.layer0_bits == 2
    # head_dim 16 -> group 16: 2 bits of codes + 16/16 bits of scales per value, on every layer
    assert preds.bits_per_value() == pytest.approx(3.0)
    fp16_layer0 = AquaKVPredictors.zeros(model, bits=2, layer0_bits="fp16")
    assert fp16_layer0.quantizer(0) is None
    assert fp16_layer0.bits_per_value() == pytest.approx((16 + 3 * 3.0) / 4)
    with pytest.raises(ValueError, match="bits"):
        AquaKVPredictors.zeros(model, bits=2.3)
