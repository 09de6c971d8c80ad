"""The row-aligned layout (weights file format v2) and how format v1 files are read: v1 files whose groups never
crossed a row load bit-exact; those that did are refused with the command that re-quantizes them."""
from __future__ import annotations

import json

import pytest
import torch
from aquakv.weights import HiggsLinear, load_quantized, quantize_model, save_quantized
from aquakv.weights.checkpoint import METADATA_FILE, TENSORS_FILE
from aquakv.weights.linear import row_group_size
from tiny_llama import make_tiny_llama
from torch import nn

Q = "model.layers.0.self_attn.q_proj"  # in_features 64 in the tiny model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = quantize_model(make_tiny_llama(seed=3), bits=2, group_size=64, seed=5, progress=False)
    directory = tmp_path_factory.mktemp("q")
    save_quantized(model, directory)
    return directory, model


def _with_header(saved, tmp_path, change):
    directory, _ = saved
    for name in (METADATA_FILE, TENSORS_FILE):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    header = json.loads((tmp_path / METADATA_FILE).read_text())
    change(header)
    (tmp_path / METADATA_FILE).write_text(json.dumps(header))
    return tmp_path


def test_saved_files_say_v2_row_aligned(saved):
    header = json.loads((saved[0] / METADATA_FILE).read_text())
    assert header["format_version"] == 2 and header["layout"] == "row-aligned"


def test_v1_file_without_cross_row_groups_loads_bit_exact(saved, tmp_path):
    def to_v1(h):
        h["format_version"] = 1
        del h["layout"]

    d = _with_header(saved, tmp_path, to_v1)
    model = load_quantized(make_tiny_llama(seed=3), d)
    x = torch.randint(0, 100, (1, 12))
    torch.testing.assert_close(model(x).logits, saved[1](x).logits, rtol=0, atol=0)


def test_v1_layer_with_cross_row_groups_is_refused_with_the_fix(saved, tmp_path):
    def to_v1_cross(h):
        h["format_version"] = 1
        del h["layout"]
        h["layers"][Q]["group_size"] = 128  # in = 64: v1 groups of 128 spanned two rows

    d = _with_header(saved, tmp_path, to_v1_cross)
    with pytest.raises(ValueError, match="run across rows .* re-quantize the model .*aquakv quantize-weights"):
        load_quantized(make_tiny_llama(seed=3), d)


def test_v2_group_size_that_is_not_row_aligned_or_missing_layout_is_refused(saved, tmp_path):
    d = _with_header(saved, tmp_path, lambda h: h["layers"][Q].update(group_size=128))
    with pytest.raises(ValueError, match="group_size: 128 is not row-aligned for in_features 64"):
        load_quantized(make_tiny_llama(seed=3), d)
    d = _with_header(saved, tmp_path, lambda h: h.pop("layout"))
    with pytest.raises(ValueError, match="layout: must be 'row-aligned' in format v2"):
        load_quantized(make_tiny_llama(seed=3), d)


@pytest.mark.parametrize("in_features,asked,grid,want", [
    (576, 256, (2, 256), (64, 576)),  # SmolLM2's hidden size: 64 divides it
    (1536, 256, (2, 256), (256, 1536)),
    (100, 64, (2, 16), (64, 128)),  # no power-of-two divisor >= 32: rows padded
    (96, 16, (2, 16), (16, 96)),  # a cap below MIN_ROW_GROUP that divides in is kept
])
def test_row_group_size_rule(in_features, asked, grid, want):
    assert row_group_size(in_features, asked, *grid) == want


@pytest.mark.parametrize("in_features", [576, 100])
def test_forward_from_codes_equals_the_dequantized_weight(in_features):
    torch.manual_seed(in_features)
    linear = nn.Linear(in_features, 48)
    layer = HiggsLinear.from_linear(linear, dim=2, n_points=256, group_size=256, seed=1)
    for rows in (1, 20):  # the decode-and-dot path and the tiled prefill path
        x = torch.randn(rows, in_features)
        want = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
        scale = float(x.abs().max() * layer.dequantize_weight().abs().sum(1).max())
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=2e-6 * scale)
