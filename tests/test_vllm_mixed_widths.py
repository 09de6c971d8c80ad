"""The vLLM plugin refuses a predictors file with per-layer key/value widths (`aquakv calibrate --budget`) at engine
start, naming it: its page rows hold one code width for keys and values. Runs without vLLM."""
import pytest
from aquakv.kv.predictor_settings import with_widths
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.vllm.config import AquaKVConfigError, EngineFacts, ServingConfig, build_codec
from tiny_llama import TINY_CONFIG, make_tiny_llama


def _facts():
    from transformers import LlamaConfig

    config = LlamaConfig(**{**TINY_CONFIG, "architectures": ["LlamaForCausalLM"]})
    return EngineFacts(hf_config=config, model="/models/tiny", kv_cache_dtype="auto", tensor_parallel_size=1)


def test_a_file_with_mixed_widths_is_refused_at_engine_start(tmp_path):
    from test_vllm_paging import _predictors

    uniform = _predictors(make_tiny_llama())
    settings = with_widths(uniform.settings, (None, 1, 3, 2), (None, 4, 2, 2))
    mixed = AquaKVPredictors(uniform.key_maps, uniform.value_maps, settings, uniform.model_info)
    mixed.save(tmp_path / "mixed.safetensors")
    with pytest.raises(AquaKVConfigError, match=r"mixed\.safetensors.*per-layer key/value bit widths.*--bits"):
        build_codec(ServingConfig("aquakv", predictors=str(tmp_path / "mixed.safetensors")), _facts())
    uniform.save(tmp_path / "uniform.safetensors")  # the same maps at one width are served
    codec = build_codec(ServingConfig("aquakv", predictors=str(tmp_path / "uniform.safetensors")), _facts())
    assert codec.needs_previous_layer
