"""AQUA-KV across the Llama family: MQA, key/value biases (Qwen2-style), and other rotate-half RoPE models.

Each tiny random-weight model is calibrated, then the cache must reproduce DynamicCache with quantization off,
generate with quantization on, and reconstruct the states at least as well as HIGGS alone.
"""
import pytest
import torch
from aquakv.hf_compat import cache_kwargs
from aquakv.kv import AquaKVCache, HiggsCache
from aquakv.kv.calibration import calibrate
from test_cache import _chunk_errors, _feed, _record_updates
from tiny_llama import TINY_CONFIG, make_tiny_llama, random_token_windows
from transformers import DynamicCache


def _tiny(kind: str):
    if kind.startswith("llama"):
        return make_tiny_llama(**{"llama-mqa": dict(num_key_value_heads=1),
                                  "llama-bias": dict(attention_bias=True)}[kind])
    import transformers

    config_cls, model_cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    fields = {k: v for k, v in TINY_CONFIG.items() if k != "initializer_range"}
    config = getattr(transformers, config_cls)(**fields, sliding_window=None, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(config).eval()


KINDS = ["llama-mqa", "llama-bias", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=KINDS)
def model_and_preds(request):
    model = _tiny(request.param)
    return model, calibrate(model, random_token_windows(6, 160, seed=5), bits=2, window=160, progress=False)


def test_unquantized_pipeline_reproduces_dynamic_cache(model_and_preds):
    model, preds = model_and_preds
    ids = torch.stack(random_token_windows(2, 60, seed=7))
    steps = [9, 1, 20, 30]
    ref = _feed(model, ids, DynamicCache(config=model.config), steps)
    got = _feed(model, ids, AquaKVCache(model, preds, quantize=False, buffer=16), steps)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # as tests/test_cache.py EXACT


def test_generate_and_reconstruction_beat_higgs(model_and_preds):
    model, preds = model_and_preds
    ids = torch.stack(random_token_windows(2, 20, seed=10))
    cache = AquaKVCache(model, preds, buffer=8)
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 40) and cache.layers[0].num_quantized > 0
    errors = {}
    for name, cache in (("aqua", AquaKVCache(model, preds, buffer=16)),
                        ("higgs", HiggsCache(model, bits=2, layer0_bits=4, buffer=16))):
        seen = _record_updates(cache)
        _feed(model, torch.stack(random_token_windows(1, 90, seed=8)), cache, [40] + [10] * 5)
        errors[name] = sum(k + v for k, v in _chunk_errors(cache, seen)[1:])
    # The summed key+value error of layers >= 1 drops to 0.56-0.60x of HIGGS's on these models, 0.75x with MQA
    # (one KV head: 16-wide keys leave the predictors less to work with). Demand a clear drop on all of them.
    assert errors["aqua"] < 0.85 * errors["higgs"], errors
