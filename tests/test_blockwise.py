"""attention="blockwise": the quantized tokens rebuilt block by block inside attention, merged by an online softmax.

Two equivalences are checked: the merge itself against SDPA over the concatenated keys (random shapes, GQA, masks
with padding, blocks of every size), and whole caches against the same cache with attention="materialize".
"""
import pytest
import torch
import torch.nn.functional as F
from aquakv.hf_compat import cache_kwargs
from aquakv.kv import AquaKVCache, HiggsCache, KiviCache
from aquakv.kv.attention import NAME, DeferredLayer, attend
from aquakv.kv.calibration import calibrate
from aquakv.kv.predictors import AquaKVPredictors
from test_cache import _feed
from tiny_llama import make_tiny_llama, random_token_windows

# float32 throughout: the merge sums the same products in another order (blocks, then the rescaled partial sums),
# a few ulps of the largest term; 2e-5 relative to values of std ~1 leaves room for T up to a few hundred.
MERGE_TOL = dict(rtol=2e-5, atol=2e-5)


def _sdpa(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("seed", range(12))
def test_online_softmax_merge_equals_sdpa(seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    b, hkv, g, d = r(1, 3), r(1, 4), r(1, 4), 8 * r(1, 5)
    sinks, n_quant, n_buf, q_len = r(0, 5), r(1, 90), r(1, 40), 0
    q_len = r(1, n_buf + 1)
    kv = sinks + n_quant + n_buf
    q = torch.randn(b, hkv * g, q_len, d, generator=gen) * 2
    k, v = torch.randn(b, hkv, kv, d, generator=gen) * 2, torch.randn(b, hkv, kv, d, generator=gen)
    mask = torch.ones(b, 1, q_len, kv, dtype=torch.bool).tril(kv - q_len)  # causal: the queries are the last tokens
    mask[0, :, :, : r(0, kv // 2)] = False  # left padding of row 0
    step = r(1, n_quant + 5)

    def blocks():
        for t0 in range(0, n_quant, step):
            t1 = min(n_quant, t0 + step)
            yield t0, t1, k[:, :, sinks + t0:sinks + t1], v[:, :, sinks + t0:sinks + t1]

    exact = lambda x: torch.cat([x[:, :, :sinks], x[:, :, sinks + n_quant:]], dim=2)  # noqa: E731
    layer = DeferredLayer(0, exact(k), exact(v), sinks, n_quant, blocks)
    scale = d ** -0.5
    got = attend(q, layer, mask, scale)
    ref = _sdpa(q, k, v, mask, scale)
    rows = mask.any(-1).view(b, 1, q_len, 1).transpose(1, 2)  # a fully masked query row has no defined output
    torch.testing.assert_close(got * rows, ref * rows, **MERGE_TOL)
    assert layer.consumed and layer.blocks is None
    # Without a mask the causal one is built: the same answer as the explicit causal mask.
    causal = torch.ones(b, 1, q_len, kv, dtype=torch.bool).tril(kv - q_len)
    layer = DeferredLayer(0, exact(k), exact(v), sinks, n_quant, blocks)
    torch.testing.assert_close(attend(q, layer, None, scale), _sdpa(q, k, v, causal, scale), **MERGE_TOL)


@pytest.fixture(scope="module")
def model():
    """Weights of std 0.02: the cache comparison measures the merge, not the chaotic amplification of std 0.2."""
    return make_tiny_llama(initializer_range=0.02)


@pytest.fixture(scope="module")
def preds(model):
    return calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False)


CACHES = {
    "aqua": lambda m, p, **kw: AquaKVCache(m, p, buffer=16, **kw),
    "higgs": lambda m, p, **kw: HiggsCache(m, 2, buffer=16, **kw),
    "kivi": lambda m, p, **kw: KiviCache(m, 2, group_size=8, buffer=16, **kw),
}
STEPS = [40, 1, 1, 30, 7, 1, 50, 1]  # flushes by prefill and by decode, quantized tokens at every later step
# Logits of this model have std ~0.2; blockwise and materialized attention differ by float order (measured
# ~3e-7 for HIGGS/AQUA, ~2.5e-6 for KIVI, whose chunks decode in another order of operations).
CACHE_TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("block_tokens", [7, 1024])
def test_blockwise_cache_gives_the_materialized_logits(model, preds, name, block_tokens):
    """Both with the chain AQUA-KV keeps between layers in float16 (blockwise's default): the same numbers."""
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    chain = dict(chain_dtype=torch.float16) if name == "aqua" else {}
    ref = _feed(model, ids, CACHES[name](model, preds, **chain), STEPS)
    cache = CACHES[name](model, preds, attention="blockwise", block_tokens=block_tokens)
    assert cache.chain_dtype == torch.float16
    decoded = []
    decode = cache.codec.decode  # (layer, store, chain, start=, stop=, ...): one call per block read
    cache.codec.decode = lambda *a, **k: decoded.append(k["stop"] - k["start"]) or decode(*a, **k)
    got = _feed(model, ids, cache, STEPS)
    torch.testing.assert_close(got, ref, **CACHE_TOL)
    assert model.config._attn_implementation == NAME
    assert decoded and max(decoded) <= block_tokens  # never more than one block of a layer at a time
    assert cache.get_seq_length() == sum(STEPS)


def test_default_blocks_are_sized_by_bytes(model, preds, monkeypatch):
    """block_tokens=None: a block holds about BLOCK_BYTES, so a prefill piece of many queries reads short blocks and a
    decode step long ones; the logits are the same as with fixed blocks."""
    from aquakv.kv import cache as cache_module

    monkeypatch.setattr(cache_module, "BLOCK_BYTES", 20_000)
    monkeypatch.setattr(cache_module, "MIN_BLOCK_TOKENS", 2)
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    cache = AquaKVCache(model, preds, buffer=16, attention="blockwise")
    sizes = {}  # queries of the forward -> block lengths read
    decode = cache.codec.decode
    cache.codec.decode = lambda *a, **k: sizes.setdefault(q_len[0], set()).add(k["stop"] - k["start"]) or decode(*a, **k)
    q_len, logits = [0], []
    for step, n in enumerate(STEPS):
        q_len[0] = n
        logits.append(_feed(model, ids[:, sum(STEPS[:step]):sum(STEPS[:step + 1])], cache, [n]))
    heads, channels = model.config.num_attention_heads, cache.layers[0].num_heads * cache.layers[0].head_dim
    for n, got in sizes.items():
        assert max(got) == 20_000 // (4 * heads * n + 16 * channels), (n, got)
    assert max(sizes[1]) > max(sizes[30]) > max(sizes[50])
    ref = _feed(model, ids, AquaKVCache(model, preds, buffer=16, attention="blockwise", block_tokens=3), STEPS)
    torch.testing.assert_close(torch.cat(logits, 1), ref, **CACHE_TOL)


def test_float32_chain_gives_the_materialized_logits(model, preds):
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    ref = _feed(model, ids, AquaKVCache(model, preds, buffer=16), STEPS)
    cache = AquaKVCache(model, preds, buffer=16, attention="blockwise", chain_dtype=torch.float32, block_tokens=7)
    torch.testing.assert_close(_feed(model, ids, cache, STEPS), ref, **CACHE_TOL)


def test_float16_chain_costs_no_accuracy(model, preds):
    """Rounding the chain to float16 (2**-11 relative) is far below 2-bit quantization's error: the logits stay as
    close to the exact cache's as with a float32 chain (measured 1.006x of its error; 1.02x allowed)."""
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    exact = _feed(model, ids, AquaKVCache(model, preds, buffer=16, quantize=False), STEPS)
    err = {dt: (_feed(model, ids, AquaKVCache(model, preds, buffer=16, chain_dtype=dt), STEPS) - exact).norm()
           for dt in (torch.float32, torch.float16)}
    assert err[torch.float32] > 0 and err[torch.float16] <= 1.02 * err[torch.float32], err


def test_blockwise_generate_left_padded_and_beams(model, preds):
    ids = torch.stack(random_token_windows(2, 24, seed=9))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    for kw in (dict(attention_mask=mask), dict(num_beams=2)):
        kw.update(max_new_tokens=30, do_sample=False, pad_token_id=0)
        ref = model.generate(ids, **cache_kwargs(model, AquaKVCache(model, preds, buffer=8, chain_dtype=torch.float16)),
                             **kw)
        cache = AquaKVCache(model, preds, buffer=8, attention="blockwise", block_tokens=5)
        got = model.generate(ids, **cache_kwargs(model, cache), **kw)
        assert torch.equal(got, ref) and cache.layers[0].num_quantized > 0


def test_switching_the_model_back_falls_back_to_materialized_keys(preds):
    model = make_tiny_llama(initializer_range=0.02)
    ids = torch.stack(random_token_windows(1, 60, seed=4))
    ref = _feed(model, ids, AquaKVCache(model, preds, buffer=16, chain_dtype=torch.float16), [40, 10, 10])
    cache = AquaKVCache(model, preds, buffer=16, attention="blockwise")
    first = _feed(model, ids[:, :50], cache, [40, 10])
    model.set_attn_implementation("sdpa")  # from now on attention reads whatever update returns: all of it
    with torch.no_grad():
        last = model(ids[:, 50:], **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(torch.cat([first, last], 1), ref, **CACHE_TOL)


def test_refusals(preds):
    model = make_tiny_llama(initializer_range=0.02)
    with pytest.raises(ValueError, match="attention must be one of"):
        HiggsCache(model, 2, attention="flash")
    with pytest.raises(ValueError, match="block_tokens"):
        HiggsCache(model, 2, attention="blockwise", block_tokens=0)
    with pytest.raises(ValueError, match="chain_dtype"):
        AquaKVCache(model, preds, chain_dtype=torch.int8)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="replaces SDPA or eager attention"):
        HiggsCache(model, 2, attention="blockwise")
    model.config._attn_implementation = "sdpa"
    # A deferred layer that attention never read (someone called update directly): the next update refuses.
    cache = AquaKVCache(model, AquaKVPredictors.zeros(model, 2), buffer=4, attention="blockwise")
    ids = torch.stack(random_token_windows(1, 12, seed=1))
    _feed(model, ids, cache, [10])
    with torch.no_grad():
        model.model.rotary_emb(torch.empty(0), torch.arange(10, 11).view(1, 1))  # positions for the direct update
    kv = torch.randn(1, 2, 1, 16)
    cache.update(kv, kv, 0)
    with pytest.raises(RuntimeError, match="did not read its .* compressed tokens"):
        cache.update(kv, kv, 1)


@pytest.mark.parametrize("structure", ["full", "rank", "per-head"])
def test_aqua_blocks_go_through_the_fused_op_and_equal_the_composed_path(model, preds, structure, monkeypatch):
    """AquaKVCodec.decode runs aquakv.ops.aqua_reconstruct (one call per part and block) and gives what
    dequantize + predict + add + rotate give (float32; the op's matmuls sum in another order)."""
    from aquakv import ops
    from aquakv.kv.aqua_codec import AquaKVCodec

    if structure != "full":
        kw = dict(rank=4) if structure == "rank" else dict(structure="per-head")
        preds = calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False, **kw)
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    calls = []
    fused = ops.aqua_reconstruct
    monkeypatch.setattr(ops, "aqua_reconstruct", lambda *a, **k: calls.append(1) or fused(*a, **k))
    got = _feed(model, ids, AquaKVCache(model, preds, buffer=16, attention="blockwise", block_tokens=9), STEPS)
    assert calls
    monkeypatch.setattr(AquaKVCodec, "fused", False)
    ref = _feed(model, ids, AquaKVCache(model, preds, buffer=16, attention="blockwise", block_tokens=9), STEPS)
    torch.testing.assert_close(got, ref, **CACHE_TOL)


@pytest.mark.parametrize("name", ["aqua", "higgs"])
def test_materialized_decode_goes_through_the_fused_op_and_equals_the_composed_path(model, preds, name, monkeypatch):
    """attention="materialize" decodes a HIGGS / AQUA-KV layer with one aqua_reconstruct per part, written straight
    into the keys and values attention reads (and AQUA-KV's chain into the next layer's buffer): the logits of
    decode + rotate + copy (AquaKVCodec.fused = False), up to float order (the op's RoPE is two products and a
    sum, rotate's an addcmul; AQUA-KV's matmuls sum in another order)."""
    from aquakv import ops
    from aquakv.kv.aqua_codec import AquaKVCodec

    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    calls = []
    fused = ops.aqua_reconstruct
    monkeypatch.setattr(ops, "aqua_reconstruct", lambda *a, **k: calls.append(k["out"].shape[2]) or fused(*a, **k))
    cache = CACHES[name](model, preds)
    got = _feed(model, ids, cache, STEPS)
    layers = model.config.num_hidden_layers
    assert len(calls) > 2 * layers and max(calls) > 2 * 16  # every layer, whole stores of several chunks
    monkeypatch.setattr(AquaKVCodec, "fused", False)
    calls.clear()
    ref = _feed(model, ids, CACHES[name](model, preds), STEPS)
    assert not calls
    torch.testing.assert_close(got, ref, **CACHE_TOL)
