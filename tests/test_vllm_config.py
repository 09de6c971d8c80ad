"""The vLLM plugin's settings and start-time refusals, without an engine: each refusal names the problem."""
import pytest
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.vllm.config import AquaKVConfigError, EngineFacts, ServingConfig, build_codec, check_engine, shard_config
from tiny_llama import TINY_CONFIG, make_tiny_llama


def _llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_CONFIG, "architectures": ["LlamaForCausalLM"], **overrides})


def _facts(config=None, **kw):
    return EngineFacts(hf_config=config or _llama_config(), model="/models/tiny", kv_cache_dtype=kw.pop("dtype", "auto"),
                       tensor_parallel_size=kw.pop("tp", 1), **kw)


@pytest.mark.parametrize("raw, message", [
    ([], "must be a JSON object"),
    ({}, 'give "predictors"'),
    ({"method": "kivi"}, "got method 'kivi'"),
    ({"predictors": ""}, "must be the path of a predictors file"),
    ({"predictors": "p.safetensors", "bits": 2}, r"unknown keys \['bits'\]"),
    ({"method": "higgs"}, "must be a positive number"),
    ({"method": "higgs", "bits": True}, "must be a positive number"),
    ({"method": "higgs", "bits": 2, "sinks": 4}, r"must be 1 \(the first token kept exact"),
    ({"method": "higgs", "bits": 2, "window": 4}, r"unknown keys \['window'\]"),
])
def test_bad_settings_are_named(raw, message):
    with pytest.raises(AquaKVConfigError, match=message):
        ServingConfig.parse(raw)


def test_settings_parse():
    assert ServingConfig.parse({"predictors": "p2.safetensors"}) == ServingConfig("aquakv", predictors="p2.safetensors")
    assert ServingConfig.parse({"method": "higgs", "bits": 3, "seed": 1}) == ServingConfig("higgs", bits=3, seed=1)


def test_a_served_llama_passes():
    check_engine(_facts())


@pytest.mark.parametrize("facts, message", [
    (lambda: _facts(dtype="fp8"), "kv_cache_dtype='auto', not 'fp8'"),
    (lambda: _facts(_llama_config(architectures=["GPTNeoXForCausalLM"])), "not \\['GPTNeoXForCausalLM'\\]"),
    (lambda: _facts(_llama_config(kv_lora_rank=64)), "latent attention"),
    (lambda: _facts(_llama_config(layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=8)),
     "hybrid sliding-window models"),
    (lambda: _facts(_llama_config(layer_types=["full_attention", "linear_attention"] * 2)), "layer types"),
    (lambda: _facts(_llama_config(mamba_d_state=16)), "state-space"),
    (lambda: _facts(pipeline_parallel_size=2), "pipeline parallelism"),
])
def test_unserved_engines_are_refused(facts, message):
    with pytest.raises(AquaKVConfigError, match=message):
        check_engine(facts())


@pytest.fixture(scope="module")
def predictors_file(tmp_path_factory):
    from test_vllm_paging import _predictors

    path = tmp_path_factory.mktemp("p") / "p2.safetensors"
    _predictors(make_tiny_llama()).save(path)
    return path


def test_predictors_build_the_codec(predictors_file):
    codec = build_codec(ServingConfig("aquakv", predictors=str(predictors_file)), _facts())
    assert codec.needs_previous_layer and codec.predictors.num_layers == TINY_CONFIG["num_hidden_layers"]


def test_higgs_needs_no_file():
    codec = build_codec(ServingConfig("higgs", bits=2), _facts())
    assert not codec.needs_previous_layer and codec.quantizers[1].settings.bits == 2


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"),
    ("corrupt", "p2.safetensors"),
    ("other model", "num_layers: predictors have 4, model has 6"),
    ("tp", "serves tensor_parallel_size 1, not 2: its maps mix KV heads"),
])
def test_bad_predictors_are_refused(predictors_file, tmp_path, problem, message):
    path, facts = predictors_file, _facts()
    if problem == "missing":
        path = tmp_path / "p2.safetensors"
    elif problem == "corrupt":
        path = tmp_path / "p2.safetensors"
        path.write_bytes(predictors_file.read_bytes()[:200])
    elif problem == "other model":
        facts = _facts(_llama_config(num_hidden_layers=6))
    else:
        facts = _facts(tp=2)
    with pytest.raises(AquaKVConfigError, match=message):
        build_codec(ServingConfig("aquakv", predictors=str(path)), facts)


def test_higgs_under_tensor_parallelism_codes_each_ranks_heads():
    codec = build_codec(ServingConfig("higgs", bits=2), _facts(tp=2))
    assert codec.predictors.kv_width == TINY_CONFIG["head_dim"]  # 2 KV heads over 2 ranks: one head each
    with pytest.raises(AquaKVConfigError, match="spans more than one head"):
        build_codec(ServingConfig("higgs", bits=2, group_size=32), _facts(tp=2))


def test_a_shard_config_splits_heads():
    shard = shard_config(_llama_config(), 2)
    assert (shard.num_key_value_heads, shard.num_attention_heads, shard.head_dim) == (1, 2, 16)
    assert AquaKVPredictors.model_info_of(type("M", (), {"config": shard})())["kv_width"] == 16


def test_higgs_shards_decode_as_the_unsharded_cache():
    """Tensor parallelism by hand: each rank codes its own KV head with the shard codec; the decoded heads equal the
    unsharded codec's decode of the same tokens (HIGGS groups and signs repeat per head)."""
    import torch
    from aquakv.kv.higgs_store import to_heads

    full = build_codec(ServingConfig("higgs", bits=2), _facts())
    shard = build_codec(ServingConfig("higgs", bits=2), _facts(tp=2))
    gen = torch.Generator().manual_seed(0)
    k, v = (to_heads(torch.randn(1, 11, full.predictors.kv_width, generator=gen), 2) for _ in range(2))
    for layer in range(full.predictors.num_layers):
        want_k, want_v = full.decode(layer, full.encode(layer, k, v, None)[0], None)
        for rank in range(2):
            part = slice(rank, rank + 1)
            got_k, got_v = shard.decode(layer, shard.encode(layer, k[:, part], v[:, part], None)[0], None)
            assert torch.equal(got_k, want_k[:, part]) and torch.equal(got_v, want_v[:, part])


@pytest.fixture(scope="module")
def per_head_file(tmp_path_factory):
    """A block-diagonal (one block per KV head) file calibrated on the tiny Llama: it serves TP 1 and 2."""
    import torch
    from aquakv.kv.calibration import calibrate

    ids = torch.randint(3, TINY_CONFIG["vocab_size"], (512,), generator=torch.Generator().manual_seed(0))
    preds = calibrate(make_tiny_llama(), [ids], bits=2, window=128, structure="per-head", progress=False)
    path = tmp_path_factory.mktemp("ph") / "ph2.safetensors"
    preds.save(path)
    return path


def test_tp_sizes_a_file_serves(predictors_file, per_head_file):
    from aquakv.vllm.shards import served_tp_sizes

    assert served_tp_sizes(AquaKVPredictors.load(predictors_file)) == [1]  # dense maps mix both heads
    assert served_tp_sizes(AquaKVPredictors.load(per_head_file)) == [1, 2]
    with pytest.raises(AquaKVConfigError, match="serves tensor_parallel_size 1 or 2, not 4"):
        build_codec(ServingConfig("aquakv", predictors=str(per_head_file)), _facts(tp=4))  # 2 heads on 4 ranks


def test_per_head_predictors_shard_as_the_unsharded_cache(per_head_file):
    """AQUA-KV under tensor parallelism by hand: each rank encodes and decodes its own KV head along its own chain
    with its slice of the per-head maps; every layer's decoded heads equal the unsharded codec's. Equal within 1e-6
    rather than bit for bit: the unsharded maps run both heads' blocks in one batched matmul, a rank one block."""
    import torch
    from aquakv.kv.higgs_store import to_heads

    spec = ServingConfig("aquakv", predictors=str(per_head_file))
    full = build_codec(spec, _facts())
    ranks = [build_codec(spec, _facts(tp=2), rank) for rank in range(2)]
    assert all(r.predictors.kv_width == TINY_CONFIG["head_dim"] for r in ranks)
    gen = torch.Generator().manual_seed(1)
    chain, chains = None, [None, None]
    for layer in range(full.predictors.num_layers):
        k, v = (to_heads(torch.randn(1, 37, full.predictors.kv_width, generator=gen), 2) for _ in range(2))
        store, *chain_next = full.encode(layer, k, v, chain)
        want_k, want_v = full.decode(layer, store, chain)
        for rank, codec in enumerate(ranks):
            part = slice(rank, rank + 1)
            shard_store, *shard_next = codec.encode(layer, k[:, part], v[:, part], chains[rank])
            got_k, got_v = codec.decode(layer, shard_store, chains[rank])
            torch.testing.assert_close(got_k, want_k[:, part], rtol=0, atol=1e-6)
            torch.testing.assert_close(got_v, want_v[:, part], rtol=0, atol=1e-6)
            chains[rank] = tuple(shard_next)
        chain = tuple(chain_next)
