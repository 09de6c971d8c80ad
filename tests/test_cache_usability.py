"""What a transformers user does with a cache (issue 21): a forward without no_grad, bits_per_value on a cache that
has compressed nothing, pickling and restoring."""
import pickle

import pytest
import torch
from aquakv.hf_compat import cache_kwargs
from aquakv.kv import AquaKVCache, HiggsCache, KiviCache, registry
from aquakv.kv.calibration import calibrate
from tiny_llama import make_tiny_llama, random_token_windows

CHUNKED = ("kivi4", "kivi2", "higgs2", "higgs3", "higgs", "aquakv", "aquakv-bf16")  # take attention="blockwise"


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def preds(model):
    return calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False)


def _modes():
    for name in registry.names():
        yield name, "materialize"
        if name in CHUNKED:
            yield name, "blockwise"


@pytest.mark.parametrize("name,attention", list(_modes()))
def test_a_forward_in_grad_mode_gives_the_no_grad_logits_and_a_gradient(model, preds, name, attention):
    """A prompt longer than sinks + buffer (128 + 4 by default), then a decode step that reads the quantized tokens,
    without torch.no_grad(): the logits of no_grad (up to the order SDPA may sum in when it records a graph: 1e-5 on
    logits of std ~1), and backward reaches the model's weights."""
    entry = registry.get(name)
    if entry.unavailable():
        pytest.skip(entry.unavailable())
    ids = torch.stack(random_token_windows(1, 141, seed=1))
    factory = entry.factory(preds, 0, attention)

    def run():
        cache = factory(model)
        first = model(input_ids=ids[:, :140], **cache_kwargs(model, cache)).logits
        second = model(input_ids=ids[:, 140:], **cache_kwargs(model, cache)).logits
        return torch.cat([first, second], 1)

    try:
        with torch.no_grad():
            expected = run()
        model.zero_grad()
        got = run()
        got.sum().backward()
    finally:
        model.set_attn_implementation("sdpa")
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda m, p: AquaKVCache(m, p), lambda m, p: HiggsCache(m, 2),
                                  lambda m, p: KiviCache(m, 2)])
def test_bits_per_value_is_none_until_something_is_compressed(model, preds, make):
    """Empty, or holding fewer tokens than sinks + buffer (all exact): None, never NaN; then a number."""
    cache = make(model, preds)
    assert cache.bits_per_value() is None
    with torch.no_grad():
        model(input_ids=torch.arange(3, 43)[None], **cache_kwargs(model, cache))
    assert cache.compressed_values() == 0 and cache.bits_per_value() is None and cache.nbytes() > 0
    with torch.no_grad():
        model(input_ids=torch.arange(3, 143)[None], **cache_kwargs(model, cache))
    assert 1 < cache.bits_per_value() < 16


@pytest.mark.parametrize("make", [lambda m, p: AquaKVCache(m, p, buffer=16), lambda m, p: HiggsCache(m, 2, buffer=16),
                                  lambda m, p: KiviCache(m, 2, buffer=16),
                                  lambda m, p: AquaKVCache(m, p, buffer=16, attention="blockwise")])
def test_a_pickled_cache_restores_and_continues_after_attach(model, preds, make):
    """pickle round trip: the same tokens and bytes; updating needs attach(model) when the cache hooks the model
    (pre-RoPE keys, blockwise attention); then the same logits as the cache that was never pickled."""
    ids = torch.stack(random_token_windows(2, 60, seed=4))
    cache = make(model, preds)
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :50], **cache_kwargs(model, cache))
            restored = pickle.loads(pickle.dumps(cache))
            assert restored.get_seq_length() == 50 and restored.nbytes() == cache.nbytes()
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                       for a, b in zip(restored.materialize(), cache.materialize()))
            if restored.tracker is not None or restored.attention == "blockwise":
                with pytest.raises(RuntimeError, match="attach"):
                    model(input_ids=ids[:, 50:51], **cache_kwargs(model, restored))
                restored.reset()
                restored = pickle.loads(pickle.dumps(cache))
                restored.attach(model)
            cache.close()  # the original's hook goes; the restored one has its own
            got = model(input_ids=ids[:, 50:], **cache_kwargs(model, restored)).logits
            ref_cache = make(model, preds)
            model(input_ids=ids[:, :50], **cache_kwargs(model, ref_cache))
            ref = model(input_ids=ids[:, 50:], **cache_kwargs(model, ref_cache)).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(got, ref)


@pytest.mark.slow
def test_the_pipeline_recipe_of_the_docs():
    """docs/kv_cache.md: a fresh cache per pipeline call, handed through to generate (the real model: pipelines need
    its tokenizer). Greedy HIGGS-4 continues this prompt as fp16 does; cache_implementation= refuses our names."""
    from aquakv.models import bundled_model_available, load_model
    from transformers import pipeline

    if not bundled_model_available():
        pytest.skip("the bundled SmolLM2 is not installed")
    model, tok = load_model()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    prompt = "The capital of France is"
    with torch.no_grad():
        got = pipe(prompt, max_new_tokens=8, do_sample=False, **cache_kwargs(model, HiggsCache(model, 4)))
        ref = pipe(prompt, max_new_tokens=8, do_sample=False)
    assert got == ref and "Paris" in got[0]["generated_text"]
    with pytest.raises(ValueError, match="cache_implementation"):
        pipe(prompt, max_new_tokens=2, cache_implementation="aquakv")
