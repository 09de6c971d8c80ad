"""Quantized-weight files (aquakv.weights.checkpoint), HiggsLinear state dicts and quantize_model: every bad input is
refused with one clear error and leaves the model and the files as they were."""
from __future__ import annotations

import json

import pytest
import torch
from aquakv.weights import HiggsLinear, load_quantized, quantize_model, save_quantized
from aquakv.weights.checkpoint import METADATA_FILE, TENSORS_FILE
from tiny_llama import make_tiny_llama
from torch import nn


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory written by save_quantized for make_tiny_llama(seed=3), and the quantized model."""
    model = quantize_model(make_tiny_llama(seed=3), bits=2, group_size=64, seed=5, progress=False)
    directory = tmp_path_factory.mktemp("q")
    save_quantized(model, directory)
    return directory, model


def _copy(saved, tmp_path):
    directory, _ = saved
    for name in (METADATA_FILE, TENSORS_FILE):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    return tmp_path


def _header(d):
    return json.loads((d / METADATA_FILE).read_text())


def _put_header(d, header):
    (d / METADATA_FILE).write_text(json.dumps(header))


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    return {name: (type(m), id(m)) for name, m in model.named_modules()}


def _assert_refused(d, *needles, path_name=METADATA_FILE):
    model = make_tiny_llama(seed=3)
    before = _snapshot(model)
    with pytest.raises(ValueError) as err:
        load_quantized(model, d)
    message = str(err.value)
    assert message.startswith(str(d / path_name)), message
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message
    assert _snapshot(model) == before, "a refused file must leave the model untouched"


Q = "model.layers.0.self_attn.q_proj"
LAST = "model.layers.3.mlp.down_proj"

HEADER_CORRUPTIONS = {
    "not json": (lambda h: "{oops", "not valid JSON"),
    "deep nesting": (lambda h: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "a list": (lambda h: [1, 2], "JSON object"),
    "format": (lambda h: {**h, "format": "other"}, "format"),
    "version true": (lambda h: {**h, "format_version": True}, "format"),
    "layers missing": (lambda h: {k: v for k, v in h.items() if k != "layers"}, "layers: missing"),
    "layers empty": (lambda h: {**h, "layers": {}}, "layers"),
    "unknown field": (lambda h: {**h, "extra": 1}, "extra: unknown field"),
    "average_bits string": (lambda h: {**h, "average_bits": "2"}, "average_bits"),
    "dim a float": (lambda h: _layer(h, Q, dim=2.0), f"layers['{Q}'].dim"),
    "seed negative": (lambda h: _layer(h, Q, seed=-1), f"layers['{Q}'].seed"),
    "bias a string": (lambda h: _layer(h, Q, bias="yes"), f"layers['{Q}'].bias"),
    "dtype": (lambda h: _layer(h, Q, dtype="int8"), f"layers['{Q}'].dtype"),
    "n_points 17": (lambda h: _layer(h, Q, n_points=17), f"layers['{Q}'].n_points"),
    "grid not shipped": (lambda h: _layer(h, LAST, dim=2, n_points=8), f"layers['{LAST}']", "no shipped grid"),
    "group 48": (lambda h: _layer(h, LAST, group_size=48), f"layers['{LAST}']", "group_size 48"),
    "unknown layer key": (lambda h: _layer(h, Q, rank=3), f"layers['{Q}']", "rank"),
    "not a layer": (lambda h: _layer(h, "model.embed_tokens", **h["layers"][Q]), "'model.embed_tokens'"),
    "shape": (lambda h: _layer(h, LAST, in_features=64), "is [64, 128] in the model but [64, 64]"),
}


def _layer(h, name, **changes):
    h = json.loads(json.dumps(h))
    h["layers"][name] = {**h["layers"].get(name, {}), **changes}
    return h


@pytest.mark.parametrize("case", sorted(HEADER_CORRUPTIONS))
def test_load_refuses_a_corrupt_header_and_leaves_the_model(saved, tmp_path, case):
    d = _copy(saved, tmp_path)
    mutate, *needles = HEADER_CORRUPTIONS[case]
    new = mutate(_header(d))
    (d / METADATA_FILE).write_text(new if isinstance(new, str) else json.dumps(new))
    _assert_refused(d, *needles)


def test_duplicate_layer_keys_are_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    text = (d / METADATA_FILE).read_text()
    (d / METADATA_FILE).write_text(text.replace('"layers": {', f'"layers": {{"{Q}": {{}},', 1))
    _assert_refused(d, "duplicate key")


def _rewrite_tensors(d, change):
    """Apply change(tensors) to the tensors file and drop the JSON's hash (files of older saves have none)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / TENSORS_FILE))
    change(tensors)
    save_file(tensors, str(d / TENSORS_FILE), metadata={"format": "aquakv-higgs-weights"})
    header = _header(d)
    del header["tensors_sha256"]
    _put_header(d, header)


TENSOR_CORRUPTIONS = {
    "unknown tensor": (lambda t: t.__setitem__("model.norm.weight", torch.ones(64)), "unknown tensor"),
    "missing tensor": (lambda t: t.pop(f"{LAST}.scales"), f"'{LAST}.scales' missing"),
    "codes int64": (lambda t: t.__setitem__(f"{Q}.codes", t[f"{Q}.codes"].long()), f"{Q}.codes", "I64"),
    "scales float32": (lambda t: t.__setitem__(f"{LAST}.scales", t[f"{LAST}.scales"].float()), f"{LAST}.scales"),
    "scales shape": (lambda t: t.__setitem__(f"{Q}.scales", t[f"{Q}.scales"][:1]), f"{Q}.scales"),
    "nan scale": (lambda t: t[f"{LAST}.scales"].__setitem__((0, 0), float("nan")), f"{LAST}.scales", "NaN"),
    "inf scale": (lambda t: t[f"{LAST}.scales"].__setitem__((1, 0), float("inf")), f"{LAST}.scales", "NaN or Inf"),
    "negative scale": (lambda t: t[f"{LAST}.scales"].__setitem__((1, 0), -1.0), f"{LAST}.scales", "negative"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CORRUPTIONS))
def test_load_refuses_corrupt_tensors_and_leaves_the_model(saved, tmp_path, case):
    d = _copy(saved, tmp_path)
    change, *needles = TENSOR_CORRUPTIONS[case]
    _rewrite_tensors(d, change)
    _assert_refused(d, *needles, path_name=TENSORS_FILE)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file\n" * 20, "truncated"])
def test_load_refuses_a_tensors_file_that_is_not_safetensors(saved, tmp_path, content):
    d = _copy(saved, tmp_path)
    data = (d / TENSORS_FILE).read_bytes()[:-50] if content == "truncated" else content
    (d / TENSORS_FILE).write_bytes(data)
    _assert_refused(d, "tensors_sha256", path_name=TENSORS_FILE)  # the hash catches it first
    header = _header(d)
    del header["tensors_sha256"]
    _put_header(d, header)
    _assert_refused(d, "not a readable safetensors file", path_name=TENSORS_FILE)


def test_files_of_two_different_saves_are_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    other = quantize_model(make_tiny_llama(seed=3), bits=3, group_size=64, seed=5, progress=False)
    save_quantized(other, tmp_path / "other")
    (d / TENSORS_FILE).write_bytes((tmp_path / "other" / TENSORS_FILE).read_bytes())
    _assert_refused(d, "tensors_sha256", "different saves", path_name=TENSORS_FILE)


def test_an_interrupted_save_keeps_the_old_files_and_no_temporary(saved, tmp_path, monkeypatch):
    d = _copy(saved, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    other = quantize_model(make_tiny_llama(seed=4), bits=3, group_size=64, progress=False)

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", fail)  # the write fails when the data is flushed to disk
    with pytest.raises(OSError, match="disk full"):
        save_quantized(other, d)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before, "old files intact, no temporary left"
    load_quantized(make_tiny_llama(seed=3), d)


def test_round_trip_is_bit_exact_and_checks_the_hash(saved):
    directory, model = saved
    fresh = load_quantized(make_tiny_llama(seed=3), directory)
    ours = dict(model.named_modules())
    layers = [(n, m) for n, m in fresh.named_modules() if isinstance(m, HiggsLinear)]
    assert len(layers) == 28
    for name, m in layers:
        assert torch.equal(m.codes, ours[name].codes) and torch.equal(m.scales, ours[name].scales)
        assert torch.equal(m.higgs_config, ours[name].higgs_config)
    assert len(_header(directory)["tensors_sha256"]) == 64


# ---- quantize_model ---------------------------------------------------------------------------------------------
def test_quantize_model_refuses_an_already_quantized_model():
    model = quantize_model(make_tiny_llama(seed=1), bits=4, group_size=64, progress=False)
    codes = model.model.layers[0].self_attn.q_proj.codes.clone()
    with pytest.raises(ValueError, match="already has 28 HiggsLinear layers"):
        quantize_model(model, bits=2, group_size=64, progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.codes, codes)


def test_quantize_model_is_all_or_nothing():
    model = make_tiny_llama(seed=1)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, :64] = 1e-9  # a group whose fp16 scale would underflow
    before = _snapshot(model)
    with pytest.raises(ValueError, match="below the smallest normal float16"):
        quantize_model(model, bits=2, group_size=64, progress=False)
    assert _snapshot(model) == before, "no layer may be replaced when a later one fails"


def test_quantize_model_refuses_a_malformed_grid():
    model = make_tiny_llama(seed=1)
    with pytest.raises(ValueError, match=r"grid_per_layer\['model.layers.0.mlp.up_proj'\] must be a \(dim, n_points\)"):
        quantize_model(model, grid_per_layer={"model.layers.0.mlp.up_proj": (2.5, 16)}, progress=False)


# ---- HiggsLinear state dicts ------------------------------------------------------------------------------------
def _layer_of(grid, seed=0, shape=(32, 128), group=64):
    torch.manual_seed(0)
    return HiggsLinear.from_linear(nn.Linear(shape[1], shape[0]), dim=grid[0], n_points=grid[1], group_size=group,
                                   seed=seed)


@pytest.mark.parametrize("other", [dict(grid=(4, 256)), dict(grid=(2, 16), seed=1), dict(grid=(2, 16), shape=(64, 64))])
def test_load_state_dict_refuses_another_grid_seed_or_shape(other):
    # (4, 256) and (2, 16) codes have the same shape at group 64, and so do [32, 128] and [64, 64] weights:
    # only the stored settings tell them apart.
    source = _layer_of(**other)
    target = _layer_of((2, 16))
    codes = target.codes.clone()
    assert source.codes.shape == target.codes.shape
    with pytest.raises(ValueError, match="higgs_config says the codes are grid"):
        target.load_state_dict(source.state_dict())
    assert torch.equal(target.codes, codes), "a refused state must not be copied in"


def test_load_state_dict_of_the_same_settings_works():
    source, target = _layer_of((2, 16), seed=4), HiggsLinear(128, 32, dim=2, n_points=16, group_size=64, seed=4,
                                                             bias=True)
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(target(x), source(x))
    assert target.grid == (2, 16) and target.grid.bits == 2.0
