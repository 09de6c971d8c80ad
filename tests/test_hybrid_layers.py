"""Hybrid models (Gemma 3): local layers kept exact in rolling windows, global layers compressed, AQUA-KV chained from
one global layer to the next (aquakv.kv.local_layers, docs/model_families.md)."""
from __future__ import annotations

import pytest
import torch
from aquakv.hf_compat import cache_kwargs
from aquakv.kv import AquaKVCache, HiggsCache, KiviCache
from aquakv.kv.calibration import calibrate
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.kv.cache_state import LocalLayer
from aquakv.kv.local_layers import chain_sources, exact_local_layers
from test_cache import EXACT, _chunk_errors, _feed, _record_updates
from test_model_families import build, build_gemma3
from tiny_llama import random_token_windows
from transformers import DynamicCache

WINDOW = 12  # build_gemma3's sliding window; layers 0, 2 local, 1, 3 global


@pytest.fixture(scope="module")
def gemma():
    model = build_gemma3(WINDOW)
    preds = calibrate(model, random_token_windows(4, 128, seed=5), bits=2, window=128, progress=False)
    return model, preds


def test_which_layers_stay_exact():
    assert exact_local_layers(build_gemma3(WINDOW).config) == {0: WINDOW, 2: WINDOW}
    assert exact_local_layers(build("mistral-sliding").config) == {}  # every layer slides: all are compressed
    assert exact_local_layers(build("llama-renamed-rotary").config) == {}
    assert chain_sources(6, {0: 5, 2: 5, 3: 5}) == [None, None, None, None, 1, 4]


def test_calibration_fits_global_layers_only_and_the_file_keeps_it(gemma, tmp_path):
    model, preds = gemma
    assert preds.exact_layers == (0, 2) and preds.sources == [None, None, None, 1]
    assert preds.key_maps[0] is None and preds.key_maps[2] is None
    assert preds.key_maps[1].in_features is None  # the first global layer: intercept only, layer 0's quantizer
    assert preds.key_maps[3].weight.shape == (preds.kv_width, preds.kv_width)
    assert preds.quantizer(1).settings.bits == 4 and preds.quantizer(3).settings.bits == 2
    path = tmp_path / "p.safetensors"
    preds.save(path)
    loaded = AquaKVPredictors.load(path)
    assert loaded.exact_layers == (0, 2)
    assert torch.equal(loaded.key_maps[3].weight, preds.key_maps[3].weight)


def test_predictors_of_another_layer_layout_are_refused(gemma):
    model, preds = gemma
    flat = AquaKVPredictors(preds.key_maps, preds.value_maps, preds.settings, preds.model_info)  # no exact layers
    with pytest.raises(ValueError, match="layers kept exact"):
        AquaKVCache(model, flat)


def test_local_layers_roll_and_bytes_count_only_the_window(gemma):
    model, preds = gemma
    cache = AquaKVCache(model, preds, buffer=16)
    _feed(model, torch.stack(random_token_windows(2, 90, seed=8)), cache, [40] + [10] * 5)
    assert isinstance(cache.layers[0], LocalLayer) and cache.layers[0].keys.shape[2] == WINDOW - 1
    assert cache.get_seq_length() == 90 and cache.layers[3].num_quantized > 0
    window_bytes = sum(t.numel() * t.element_size() for i in (0, 2) for t in cache.layers[i].tensors())
    assert window_bytes == 2 * 2 * 2 * (WINDOW - 1) * model.config.num_key_value_heads * model.config.head_dim * 2
    assert cache.nbytes() > window_bytes
    # once the window has rolled, a crop would need tokens it dropped: refused before anything changes
    with pytest.raises(ValueError, match="sliding-window layer holds only"):
        cache.crop(-5)
    assert cache.get_seq_length() == 90 and cache.layers[0].keys.shape[2] == WINDOW - 1
    short = AquaKVCache(model, preds, buffer=4)
    _feed(model, torch.stack(random_token_windows(2, 10, seed=8)), short, [6, 4])
    short.crop(-3)  # still inside the window: exact
    assert short.get_seq_length() == 7 and short.layers[0].keys.shape[2] == 7


def test_quantized_hybrid_cache_follows_dynamic_cache(gemma):
    """The window still comes through the mask transformers builds for an exact local layer, and AQUA-KV's global
    layer 3, predicted from global layer 1, beats HIGGS alone at equal bits."""
    model, preds = gemma
    ids = torch.stack(random_token_windows(2, 90, seed=8))
    steps = [40] + [10] * 5
    ref = _feed(model, ids, DynamicCache(config=model.config), steps)
    errors = {}
    for name, cache in (("aqua", AquaKVCache(model, preds, buffer=16)),
                        ("higgs", HiggsCache(model, bits=2, layer0_bits=4, buffer=16)),
                        ("kivi", KiviCache(model, bits=2, buffer=16))):
        seen = _record_updates(cache)
        got = _feed(model, ids, cache, steps)
        errors[name] = sum(k + v for k, v in _chunk_errors(cache, seen)[1:])
        # tiny random model, 2 bits on 2 of 4 layers: logits stay close to the reference's (std ~1.6)
        assert (got - ref).abs().mean() < 0.5, name
    assert errors["aqua"] < 0.9 * errors["higgs"], errors


@pytest.mark.parametrize("kw", [dict(max_new_tokens=20, pad=True), dict(max_new_tokens=12, num_beams=2)])
def test_generate_with_hybrid_cache(gemma, kw):
    model, preds = gemma
    ids = torch.stack(random_token_windows(2, 20, seed=9))
    kw = dict(kw, do_sample=False, pad_token_id=0)
    if kw.pop("pad", False):
        mask = torch.ones_like(ids)
        ids[1, :5], mask[1, :5] = 0, 0
        kw["attention_mask"] = mask
    ref = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    got = model.generate(ids, **cache_kwargs(model, AquaKVCache(model, preds, quantize=False, buffer=8)), **kw)
    assert torch.equal(got, ref)
    cache = AquaKVCache(model, preds, buffer=8)
    model.generate(ids, **cache_kwargs(model, cache), **kw)
    assert cache.layers[1].num_quantized > 0 and cache.layers[0].batch == 2 * kw.get("num_beams", 1)


def test_blockwise_equals_materialized_on_a_hybrid_model(gemma):
    model, preds = gemma
    ids = torch.stack(random_token_windows(2, 90, seed=8))
    steps = [40] + [10] * 5
    ref = _feed(model, ids, AquaKVCache(model, preds, buffer=16, chain_dtype=torch.float16), steps)
    got = _feed(model, ids, AquaKVCache(model, preds, buffer=16, attention="blockwise", block_tokens=16), steps)
    torch.testing.assert_close(got, ref, **EXACT)
