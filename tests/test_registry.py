"""The registry of comparison caches: names, one label per entry, factories, unavailable backends explained."""
import pytest
import torch
from aquakv.kv import registry
from aquakv.kv.predictors import AquaKVPredictors
from tiny_llama import make_tiny_llama


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


def test_names_and_labels(model):
    assert registry.names() == ("fp16", "dynamic", "kivi4", "kivi2", "higgs2", "higgs3", "higgs", "aquakv",
                                "aquakv-bf16", "fp8", "quanto", "hqq")
    preds = AquaKVPredictors.zeros(model, 3)
    labels = {n: registry.get(n).label(preds) for n in registry.names()}
    assert labels["fp16"] == "fp16 (unquantized)" and labels["kivi2"] == "KIVI-2"
    assert labels["higgs2"] == "HIGGS-2 (no predictors)" and labels["higgs"] == "HIGGS-3 (no predictors)"
    assert labels["aquakv"] == "AQUA-KV-3" and labels["aquakv-bf16"] == "AQUA-KV-3 (bf16 predictors)"
    assert labels["quanto"] == "transformers QuantizedCache (quanto, 2-bit)"
    del labels["higgs"]  # at 3-bit predictors it is HIGGS-3, like higgs3 (same bits, the predictors' groups)
    assert len(set(labels.values())) == len(labels)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown cache 'kivi3'.*kivi2"):
        registry.get("kivi3")


def test_predictor_rows_need_predictors():
    with pytest.raises(ValueError, match="predictors"):
        registry.get("aquakv").factory()


@pytest.mark.parametrize("name", ["fp16", "kivi4", "kivi2", "higgs2", "higgs3", "higgs", "aquakv", "aquakv-bf16",
                                  "fp8"])
def test_every_available_factory_builds_a_cache_that_serves_the_model(model, name):
    from aquakv.hf_compat import cache_kwargs

    preds = AquaKVPredictors.zeros(model, 2)
    entry = registry.get(name)
    if entry.unavailable():
        pytest.skip(entry.unavailable())
    cache = entry.factory(preds, seed=0)(model)
    with torch.no_grad():
        out = model(input_ids=torch.arange(3, 40)[None], use_cache=True, **cache_kwargs(model, cache))
    assert torch.isfinite(out.logits).all()
    getattr(cache, "close", lambda: None)()


def test_higgs_follows_the_predictors_settings(model):
    preds = AquaKVPredictors.zeros(model, 3, grid_dim=2, seed=7)
    cache = registry.get("higgs").factory(preds)(model)
    assert cache.settings.bits == 3 and cache.settings.seed == 7
    cache.close()


def test_unavailable_rows_carry_the_reason(monkeypatch):
    from aquakv.kv import baselines

    monkeypatch.setattr(baselines, "transformers_cache_backends",
                        lambda: {"fp8": None, "quanto": "needs the `optimum-quanto` package", "hqq": None})
    rows = registry.rows(["kivi2", "quanto", "kivi2"])
    assert [r.name for r in rows] == ["kivi2", "quanto"]  # duplicates dropped, order kept
    assert rows[1].factory is None and "optimum-quanto" in rows[1].unavailable
    with pytest.raises(RuntimeError, match="unavailable"):
        registry.get("quanto").factory()


def test_the_registry_module_is_light():
    import subprocess
    import sys

    code = "import sys, aquakv.kv.registry as r\nprint(r.names()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "fp16", out.stderr


@pytest.mark.parametrize("name", ["kivi2", "higgs2", "higgs", "aquakv"])
def test_chunked_caches_take_the_attention_mode(name):
    from tiny_llama import make_tiny_llama

    model = make_tiny_llama()  # its own: blockwise switches the model's attention implementation
    cache = registry.get(name).factory(AquaKVPredictors.zeros(model, 2), seed=0, attention="blockwise")(model)
    assert cache.attention == "blockwise" and model.config._attn_implementation == "aquakv_blockwise"
