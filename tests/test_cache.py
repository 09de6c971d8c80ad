"""AquaKVCache / HiggsCache as transformers 5.x caches on the tiny GQA Llama.

Small `sinks`/`buffer` values make every test cross several chunk boundaries with a few dozen tokens.
"""
import gc

import pytest
import torch
from aquakv.hf_compat import cache_kwargs
from aquakv.kv import AquaKVCache, ChunkedKVCache, HiggsCache
from aquakv.kv.calibration import calibrate
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.kv.cache_state import LocalLayer
from tiny_llama import make_tiny_llama, random_token_windows
from transformers import DynamicCache

# Logits of the tiny model have std ~1.6. quantize=False differs from DynamicCache only by the un-rotation /
# re-rotation of chunk keys and P + (K - P) in fp32: a few ulps per key, ~1e-5 on logits (measured 1.5e-5).
EXACT = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def preds(model):
    return calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False)


def _feed(model, ids, cache, steps, mask=None):
    """Run ids [B, T] through the model in pieces of the given sizes; concatenated logits [B, T, V]."""
    out, start = [], 0
    with torch.no_grad():
        for n in steps:
            kw = {} if mask is None else {"attention_mask": mask[:, :start + n]}
            out.append(model(ids[:, start:start + n], **cache_kwargs(model, cache), **kw).logits)
            start += n
    return torch.cat(out, 1)


STEPS = [9, 1, 1, 20, 5, 1, 30, 3]  # 70 tokens: sinks, partial buffers, flushes by prefill and by decode


def test_unquantized_pipeline_reproduces_dynamic_cache(model, preds):
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=7))
    ref = _feed(model, ids, DynamicCache(config=model.config), STEPS)
    cache = AquaKVCache(model, preds, quantize=False, sinks=4, buffer=16)
    got = _feed(model, ids, cache, STEPS)
    assert cache.layers[0].num_quantized > 16  # several chunks went through predictors, un- and re-rotation
    torch.testing.assert_close(got, ref, **EXACT)


def _record_updates(cache):
    """Wrap cache.update to keep, per layer, every state the model hands it: (keys post-RoPE, values) [B, H, T, D]."""
    seen, update = {}, cache.update

    def recording_update(keys, values, layer_idx, *args, **kwargs):
        old = seen.get(layer_idx)
        seen[layer_idx] = (keys, values) if old is None else (torch.cat([old[0], keys], 2), torch.cat([old[1], values], 2))
        return update(keys, values, layer_idx, *args, **kwargs)

    cache.update = recording_update
    return seen


def _chunk_errors(cache, seen) -> list[tuple[float, float]]:
    """Per compressed layer (keys, values), in order: relative squared error of the quantized tokens as the cache
    hands them back, against the states the model handed the cache for those very tokens. Exact local layers of a
    hybrid model (aquakv.kv.local_layers) are left out: the first entry is the first compressed layer."""
    compressed = [i for i, layer in enumerate(cache.layers) if not isinstance(layer, LocalLayer)]
    first = cache.layers[compressed[0]]
    chunk = slice(first.num_sinks, first.num_sinks + first.num_quantized)
    errs, states = [], cache.materialize()
    for (k_hat, v_hat), (k, v) in ((states[i], seen[i]) for i in compressed):
        errs.append(tuple(((a[:, :, chunk] - b[:, :, chunk]).pow(2).sum() / b[:, :, chunk].pow(2).sum()).item()
                          for a, b in ((k_hat, k), (v_hat, v))))
    return errs


def test_quantized_cache_is_close_and_aqua_beats_higgs(model, preds):
    """Cache-level product claim: at equal code bits AQUA-KV reconstructs the states the model handed the cache
    more closely than HIGGS alone, on chunks flushed by prefill and by decode steps.

    The reference is what each forward handed the cache, not a one-pass DynamicCache: fed in steps, the later
    tokens' states themselves depend on the quantized cache, and on this deliberately chaotic random model that
    propagation (not the codec) would dominate the comparison."""
    ids = torch.stack(random_token_windows(1, 90, seed=8))
    errs = {}
    for name, cache in {"aqua": AquaKVCache(model, preds, buffer=16),
                        "higgs": HiggsCache(model, bits=2, layer0_bits=4, buffer=16)}.items():
        seen = _record_updates(cache)
        _feed(model, ids, cache, [40] + [10] * 5)
        errs[name] = _chunk_errors(cache, seen)
    # HIGGS (2, 16) on norm-scaled rotated groups: ~0.10 relative squared error per layer (grid MSE 0.1076);
    # layer 0 in 4 bits (2, 256): ~0.0077.
    for k, v in errs["higgs"][1:]:
        assert 0.07 < k < 0.13 and 0.07 < v < 0.13, errs["higgs"]
    assert errs["aqua"][0] == pytest.approx(errs["higgs"][0], rel=0.05)  # same centered-vs-plain 4-bit layer 0
    aqua, higgs = (sum(k + v for k, v in errs[n][1:]) for n in ("aqua", "higgs"))
    assert 0 < aqua < 0.8 * higgs, errs  # measured ratio ~0.62 (calibration report: ~0.6)
    assert all(a[1] < 0.7 * h[1] for a, h in zip(errs["aqua"][1:], errs["higgs"][1:])), errs  # values: ~0.4x


def test_cache_errors_match_the_calibration_report(model, preds):
    """Quantization in the loop means calibration sees exactly what inference sees: the held-out calibration window
    fed through the cache in one forward (one chunk) has the per-layer errors the calibration report measured."""
    held_out = random_token_windows(4, 160, seed=5)[-1]  # the last window of the fixture's data is the held-out one
    cache = AquaKVCache(model, preds, buffer=16)
    seen = _record_updates(cache)
    _feed(model, held_out[None], cache, [160])
    assert cache.layers[0].num_quantized == 156
    for (k, v), row in zip(_chunk_errors(cache, seen), preds.report):
        # Calibration captures states in fp16 before quantizing, the cache in its fp16 buffer after RoPE: a few
        # codes differ; the error sums agree within ~2% (measured 0.05% to 2.3% off).
        assert k == pytest.approx(row["key_rel_err"], rel=0.05) and v == pytest.approx(row["value_rel_err"], rel=0.05)


def test_left_padded_batch_generate_matches_dynamic_cache(model, preds):
    ids = torch.stack(random_token_windows(2, 24, seed=9))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding: row 1 starts at position 0 on its 8th token
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    got = model.generate(ids, **cache_kwargs(model, AquaKVCache(model, preds, quantize=False, buffer=8)), **kw)
    assert torch.equal(got, ref)
    cache = AquaKVCache(model, preds, buffer=8)
    out = model.generate(ids, **cache_kwargs(model, cache), **kw)
    assert out.shape == ref.shape and cache.get_seq_length() == out.shape[1] - 1
    assert cache.positions[1, 7].item() == 0 and cache.positions[1, -1].item() == out.shape[1] - 2 - 7


def test_beam_search_matches_dynamic_cache_and_runs_quantized(model, preds):
    ids = torch.stack(random_token_windows(2, 20, seed=10))
    kw = dict(max_new_tokens=25, num_beams=2, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    got = model.generate(ids, **cache_kwargs(model, AquaKVCache(model, preds, quantize=False, buffer=8)), **kw)
    assert torch.equal(got, ref)
    cache = AquaKVCache(model, preds, buffer=8)
    out = model.generate(ids, **cache_kwargs(model, cache), **kw)
    assert out.shape[0] == 2 and cache.layers[0].batch == 4  # 2 prompts x 2 beams
    assert cache.layers[0].num_quantized > 0


@pytest.mark.parametrize("layer0_bits", [None, 4, "fp16"])
def test_higgs_codec_gives_the_zero_predictor_logits_without_keeping_a_previous_layer(model, layer0_bits):
    """HiggsCache (the AQUA-KV codec given zero predictors) against AquaKVCache with zero predictors: bit-identical
    logits over prefill and decode flushes, while no layer's reconstruction is ever kept for the next one."""
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=16))
    old = AquaKVCache(model, AquaKVPredictors.zeros(model, 2, layer0_bits=layer0_bits), sinks=4, buffer=16)
    new = HiggsCache(model, 2, layer0_bits=layer0_bits, sinks=4, buffer=16)
    update, prevs = new.update, []

    def watched_update(*args, **kwargs):
        out = update(*args, **kwargs)
        prevs.append(new.forward.chain)
        return out

    new.update = watched_update
    expected = _feed(model, ids, old, STEPS)
    assert old.layers[0].num_quantized > 3 * 16 and old.forward.chain is None  # several chunks; dropped after the last layer
    assert torch.equal(_feed(model, ids, new, STEPS), expected)
    assert len(prevs) == 4 * len(STEPS) and all(p is None for p in prevs)
    assert new.nbytes() == old.nbytes() and not new.codec.needs_previous_layer


def test_reorder_moves_codes_exactly(model, preds):
    """Reordering rows of a quantized cache equals having fed the rows in that order (codes are row-local)."""
    ids = torch.stack(random_token_windows(3, 40, seed=11))
    order = torch.tensor([2, 0, 0])
    a = AquaKVCache(model, preds, buffer=16)
    _feed(model, ids, a, [30])
    a.reorder_cache(order)
    b = AquaKVCache(model, preds, buffer=16)
    _feed(model, ids[order], b, [30])
    torch.testing.assert_close(_feed(model, ids[order, 30:], a, [10]), _feed(model, ids[order, 30:], b, [10]),
                               rtol=0, atol=0)
    assert a.nbytes() == b.nbytes()


@pytest.mark.parametrize("remove", [3, 20, 50, 68, 80])  # buffer only, into chunks, to a chunk edge, sinks, all
def test_crop_keeps_an_exact_prefix(model, preds, remove):
    ids = torch.stack(random_token_windows(2, 70, seed=12))
    cache = AquaKVCache(model, preds, sinks=4, buffer=16)
    _feed(model, ids, cache, [20, 16, 16, 18])
    before = cache.materialize()
    cache.crop(-remove)
    keep = max(70 - remove, 0)
    assert cache.get_seq_length() == keep
    after = cache.materialize()
    for (k0, v0), (k1, v1) in zip(before, after):
        if keep:
            assert torch.equal(k1, k0[:, :, :keep]) and torch.equal(v1, v0[:, :, :keep])
    if keep:  # and the cropped cache keeps working
        logits = _feed(model, torch.stack(random_token_windows(2, 5, seed=99)), cache, [5])
        assert torch.isfinite(logits).all() and cache.get_seq_length() == keep + 5
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_crop_then_continue_matches_dynamic_cache(model, preds):
    ids = torch.stack(random_token_windows(1, 60, seed=13))
    ref_cache, cache = DynamicCache(config=model.config), AquaKVCache(model, preds, quantize=False, buffer=8)
    for c in (ref_cache, cache):
        _feed(model, ids, c, [30, 10])
        c.crop(-13)
    torch.testing.assert_close(_feed(model, ids[:, 27:], cache, [5, 1]),
                               _feed(model, ids[:, 27:], ref_cache, [5, 1]), **EXACT)


def test_reset_empties_and_reuse_equals_fresh_cache(model, preds):
    ids = torch.stack(random_token_windows(2, 40, seed=14))
    cache = AquaKVCache(model, preds, buffer=16)
    _feed(model, ids, cache, [40])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0 and cache.positions is None
    again = _feed(model, ids[:1], cache, [25, 5])  # a different batch size after reset is fine
    fresh = _feed(model, ids[:1], AquaKVCache(model, preds, buffer=16), [25, 5])
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_memory_accounting_is_exact(model, preds):
    batch, sinks, buffer, steps = 2, 4, 16, [30, 7, 1]
    cache = AquaKVCache(model, preds, sinks=sinks, buffer=buffer)
    _feed(model, torch.stack(random_token_windows(batch, sum(steps), seed=15)), cache, steps)
    n_quant, n_buf = 26, 12  # 30 -> 4 sinks + 26 flushed at once; then 7 + 1 + ... stay in the buffer
    n_buf = sum(steps) - sinks - n_quant
    layer = cache.layers[0]
    assert (layer.num_sinks, layer.num_quantized, layer.num_buffered) == (sinks, n_quant, n_buf)
    c, layers = preds.kv_width, preds.num_layers  # C = 32, head_dim 16 -> HIGGS group 16 (2 groups per row)
    row_bytes_2bit = 32 // 2 * 4 // 8 + 2 * 2  # 16 codes of 4 bits (d=2, n=16) + 2 fp16 scales = 12
    row_bytes_4bit = 32 // 2 * 8 // 8 + 2 * 2  # layer 0: 16 codes of 8 bits (d=2, n=256) + 2 scales = 20
    codes = 2 * batch * n_quant * (row_bytes_4bit + (layers - 1) * row_bytes_2bit)  # K and V
    exact = 2 * batch * (sinks + n_buf) * c * 2 * layers  # fp16 sinks and buffer, K and V
    positions = batch * sum(steps) * 4  # int32
    assert cache.nbytes() == codes + exact + positions
    assert cache.bits_per_value() == pytest.approx(8 * codes / (2 * batch * n_quant * c * layers))
    assert HiggsCache(model, 2).bits_per_value() is None  # nothing compressed: None, never NaN (issue 21)


def test_hooks_removed_on_close_and_garbage_collection(model, preds):
    rotary = model.model.rotary_emb
    gc.collect()  # caches of earlier tests kept alive by reference cycles (e.g. a pytest.raises traceback) go now
    base = len(rotary._forward_hooks)
    with AquaKVCache(model, preds) as cache:
        assert len(rotary._forward_hooks) == base + 1
    assert len(rotary._forward_hooks) == base
    with pytest.raises(RuntimeError, match="closed"):
        _feed(model, torch.stack(random_token_windows(1, 5)), cache, [5])
    cache = AquaKVCache(model, preds)
    _feed(model, torch.stack(random_token_windows(1, 5)), cache, [5])
    del cache
    gc.collect()
    assert len(rotary._forward_hooks) == base


def test_mismatched_predictors_and_misuse_raise_clear_errors(model, preds):
    with pytest.raises(ValueError, match="num_layers"):
        AquaKVCache(make_tiny_llama(num_hidden_layers=3), preds)
    cache = AquaKVCache(model, preds)
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="no positions"):
        cache.update(k, k, 0)  # not called from a model forward: positions unknown
    assert isinstance(cache, ChunkedKVCache) and not AquaKVPredictors.zeros(model).has_adapters
