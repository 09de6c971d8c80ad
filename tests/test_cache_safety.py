"""What the chunked caches guarantee when something fails: an update completes or leaves the cache as it was; a
forward that fails after some layers took its tokens leaves a cache that refuses every later call until reset();
bad batch indices are refused before anything changes. And nbytes() counts every byte the cache really holds.
"""
import dataclasses

import pytest
import torch
from aquakv.kv import AquaKVCache, HiggsCache, KiviCache
from aquakv.kv.predictors import AquaKVPredictors
from test_cache import _feed
from tiny_llama import make_tiny_llama, random_token_windows


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


CACHES = {
    "aqua-zeros": lambda m: AquaKVCache(m, AquaKVPredictors.zeros(m, 2), sinks=4, buffer=16),
    "higgs": lambda m: HiggsCache(m, 2, layer0_bits=4, sinks=4, buffer=16),
    "kivi": lambda m: KiviCache(m, 2, group_size=8, sinks=4, buffer=16),
}


def _poison(cache, layer: int, call: int):
    """Make cache.update put a NaN into the keys of `layer` on its `call`-th update (0-based)."""
    update, calls = cache.update, {}

    def poisoned(keys, values, layer_idx, *args, **kwargs):
        n = calls[layer_idx] = calls.get(layer_idx, -1) + 1
        if layer_idx == layer and n == call:
            keys = keys.clone()
            keys[0, 0, -1, 0] = float("nan")
        return update(keys, values, layer_idx, *args, **kwargs)

    cache.update = poisoned


def _lengths(cache):
    return [layer.get_seq_length() for layer in cache.layers]


def _same_state(a, b):
    """The two caches hold the same tokens: same lengths, batch and bytes, same keys/values as attention reads."""
    assert _lengths(a) == _lengths(b) and a.layers[0].batch == b.layers[0].batch and a.nbytes() == b.nbytes()
    for (ka, va), (kb, vb) in zip(a.materialize(), b.materialize()):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


IDS = torch.stack(random_token_windows(2, 60, seed=21))


def test_a_failure_in_layer_0_leaves_the_cache_as_it_was(model):
    """HIGGS refuses NaN when a chunk is flushed; at layer 0 nothing of the forward has changed the cache yet."""
    cache, twin = HiggsCache(model, 2, sinks=4, buffer=16), HiggsCache(model, 2, sinks=4, buffer=16)
    _feed(model, IDS, cache, [10])
    _feed(model, IDS, twin, [10])
    _poison(cache, layer=0, call=0)
    with pytest.raises(ValueError, match="NaN"):
        _feed(model, IDS[:, 10:], cache, [12])  # 6 buffered + 12 -> a flush at every layer
    _same_state(cache, twin)
    torch.testing.assert_close(_feed(model, IDS[:, 10:], cache, [12, 3]), _feed(model, IDS[:, 10:], twin, [12, 3]),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["aqua-zeros", "higgs"])
def test_a_failure_after_layer_0_makes_the_cache_refuse_until_reset(model, kind):
    cache = CACHES[kind](model)
    _feed(model, IDS, cache, [10])
    _poison(cache, layer=2, call=0)
    with pytest.raises(ValueError, match="NaN"):
        _feed(model, IDS[:, 10:], cache, [12])
    assert _lengths(cache)[3] == 10  # layers 0 and 1 took the 12 tokens, 2 and 3 did not: they disagree
    for call in (lambda: _feed(model, IDS[:, 10:], cache, [1]), cache.materialize, lambda: cache.crop(-1),
                 lambda: cache.reorder_cache(torch.tensor([1, 0]))):
        with pytest.raises(RuntimeError, match=r"unusable.*layer 2.*NaN.*reset\(\)"):
            call()
    cache.reset()
    fresh = CACHES[kind](model)
    torch.testing.assert_close(_feed(model, IDS, cache, [30, 5]), _feed(model, IDS, fresh, [30, 5]), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["higgs", "kivi"])
def test_a_forward_that_stops_between_layers_is_detected(model, kind):
    """The model itself fails after layer 2 took its tokens: the next forward refuses instead of attending to
    layers of different lengths (KIVI has no positions to notice it otherwise)."""
    cache = CACHES[kind](model)
    _feed(model, IDS, cache, [10])

    class Stop(Exception):
        pass

    def fail(*args):
        raise Stop

    handle = model.model.layers[2].mlp.register_forward_hook(fail)
    try:
        with pytest.raises(Stop):
            _feed(model, IDS[:, 10:], cache, [5])
    finally:
        handle.remove()
    with pytest.raises(RuntimeError, match=r"did not update every layer.*\[15, 15, 15, 10\].*reset\(\)"):
        _feed(model, IDS[:, 10:], cache, [5])
    cache.reset()
    assert torch.isfinite(_feed(model, IDS, cache, [20])).all()


BAD_INDICES = [([0, 2], IndexError), ([-1, 0], IndexError), ([0.0, 1.0], TypeError), ([[0, 1]], ValueError),
               ([True, False], TypeError)]


@pytest.mark.parametrize("kind", list(CACHES))
def test_a_bad_batch_index_changes_nothing(model, kind):
    cache, twin = CACHES[kind](model), CACHES[kind](model)
    _feed(model, IDS, cache, [30])
    _feed(model, IDS, twin, [30])
    for method in ("reorder_cache", "batch_select_indices"):
        for index, error in BAD_INDICES:
            with pytest.raises(error, match=method):
                getattr(cache, method)(torch.tensor(index))
            _same_state(cache, twin)
    torch.testing.assert_close(_feed(model, IDS[:, 30:], cache, [3]), _feed(model, IDS[:, 30:], twin, [3]),
                               rtol=0, atol=0)


def _held_bytes(cache) -> int:
    """Bytes of every distinct storage reachable from the cache's state (layers, codec stores, positions and the
    transient per-forward state), each storage counted once, however many views share it."""
    seen: dict[int, int] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for field in dataclasses.fields(obj):
                walk(getattr(obj, field.name))

    for layer in cache.layers:
        walk([v for k, v in vars(layer).items() if k not in ("dtype", "device")])
    walk([cache.positions, cache.forward.chain, cache.forward.rope])
    return sum(seen.values())


@pytest.mark.parametrize("kind", list(CACHES))
def test_nbytes_is_every_byte_held(model, kind):
    """nbytes() against the storages really kept: after prefill and decode flushes, a reorder, and crops into the
    buffer, into the chunks and into the sinks (cropped tensors must not keep the old storage alive)."""
    cache = CACHES[kind](model)
    ids = torch.stack(random_token_windows(2, 90, seed=22))

    def check(what):
        assert cache.nbytes() == _held_bytes(cache), what

    _feed(model, ids, cache, [37])
    check("prefill: sinks and the flushed chunk cut from one update")
    _feed(model, ids[:, 37:], cache, [1] * 10 + [8])
    check("decode steps and a flush")
    cache.reorder_cache(torch.tensor([1, 1]))
    check("reorder")
    for remove in (3, 20, 28):
        cache.crop(-remove)
        check(f"crop -{remove}")
    assert cache.get_seq_length() == 4
    cache.crop(-2)
    check("crop into the sinks")
    _feed(model, ids[:, 40:], cache, [20])
    check("flush after crops")
