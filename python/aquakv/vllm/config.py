"""The `additional_config={"aquakv": {...}}` of a vLLM engine: its keys, the codec they build, and every refusal
made at engine start (docs/vllm.md). Nothing here imports vLLM: the backend hands in the facts it reads from
vLLM's config, so the refusals are unit-tested without an engine.

    {"predictors": "p2.safetensors"}                 AQUA-KV at that file's bits (from `aquakv calibrate`)
    {"method": "higgs", "bits": 2}                   HIGGS alone, data-free (also "seed", "group_size", "grid_dim")
    "sinks": 1 (default) or 0                        keep each sequence's first token exact (aquakv.vllm.sinks)
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from types import SimpleNamespace

from aquakv.kv.aqua_codec import AquaKVCodec
from aquakv.kv.local_layers import exact_local_layers
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.kv.support import check_config
from aquakv.vllm.shards import shard_predictors

METHODS = ("aquakv", "higgs")
KEYS = {"aquakv": {"method", "predictors", "sinks"},
        "higgs": {"method", "bits", "seed", "group_size", "grid_dim", "sinks"}}
# Architectures whose vLLM model applies rotate-half (neox) RoPE to whole heads, which the plugin un-rotates and
# re-rotates; others are refused until checked (docs/model_families.md lists the families and why).
SERVED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class AquaKVConfigError(ValueError):
    """A setting the plugin cannot serve: raised at engine start, before any request."""


@dataclass(frozen=True)
class ServingConfig:
    method: str  # "aquakv" or "higgs"
    predictors: str | None = None
    bits: float = 2
    seed: int = 0
    group_size: int | None = None
    grid_dim: int = 2
    sinks: int = 1

    @classmethod
    def parse(cls, raw) -> "ServingConfig":
        if not isinstance(raw, dict):
            raise AquaKVConfigError(f'additional_config["aquakv"] must be a JSON object, got {raw!r}')
        method = raw.get("method", "aquakv" if "predictors" in raw else None)
        if method not in METHODS:
            raise AquaKVConfigError(f'additional_config["aquakv"]: give "predictors" (a file from `aquakv calibrate`) '
                                    f'or "method": "higgs" with "bits"; got method {method!r} (one of {METHODS})')
        unknown = sorted(set(raw) - KEYS[method])
        if unknown:
            raise AquaKVConfigError(f'additional_config["aquakv"]: unknown keys {unknown} for method {method!r} '
                                    f'(known: {sorted(KEYS[method])})')
        sinks = raw.get("sinks", 1)
        if sinks not in (0, 1) or isinstance(sinks, bool):
            raise AquaKVConfigError(f'additional_config["aquakv"]["sinks"] must be 1 (the first token kept exact, the '
                                    f'default) or 0, got {sinks!r}')
        if method == "aquakv":
            path = raw.get("predictors")
            if not isinstance(path, str) or not path:
                raise AquaKVConfigError('additional_config["aquakv"]["predictors"] must be the path of a predictors '
                                        'file from `aquakv calibrate`')
            return cls("aquakv", predictors=path, sinks=sinks)
        bits = raw.get("bits")
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 0:
            raise AquaKVConfigError(f'additional_config["aquakv"]["bits"] must be a positive number for method '
                                    f'"higgs", got {bits!r}')
        group = raw.get("group_size")
        return cls("higgs", bits=bits, seed=int(raw.get("seed", 0)), group_size=None if group is None else int(group),
                   grid_dim=int(raw.get("grid_dim", 2)), sinks=sinks)


@dataclass(frozen=True)
class EngineFacts:
    """What the plugin needs from vLLM's config (read by the backend)."""

    hf_config: object  # the model's transformers config
    model: str  # the model directory or name
    kv_cache_dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int = 1


def check_engine(facts: EngineFacts) -> None:
    """Refuse what the plugin cannot serve correctly, naming it."""
    if facts.kv_cache_dtype != "auto":
        raise AquaKVConfigError(f"aquakv sets the KV cache's format itself: run it with kv_cache_dtype='auto', not "
                                f"{facts.kv_cache_dtype!r}")
    cfg = facts.hf_config
    archs = list(getattr(cfg, "architectures", None) or [])
    try:
        check_config(cfg, who="aquakv (vLLM)")
    except ValueError as e:
        raise AquaKVConfigError(str(e)) from None
    if not any(a in SERVED_ARCHITECTURES for a in archs):
        shown = archs or "a model that declares no architecture"
        raise AquaKVConfigError(f"aquakv (vLLM) serves {list(SERVED_ARCHITECTURES)}, not {shown} (docs/vllm.md says "
                                f"what a new family needs checked)")
    if exact_local_layers(cfg):
        raise AquaKVConfigError("aquakv (vLLM) does not serve hybrid sliding-window models yet: the transformers cache "
                                "keeps their local layers exact, which vLLM's immutable pages do not")
    if facts.pipeline_parallel_size != 1:
        raise AquaKVConfigError("aquakv (vLLM): pipeline parallelism splits the layers that AQUA-KV chains; run "
                                "with pipeline_parallel_size=1")


def model_shim(facts: EngineFacts) -> SimpleNamespace:
    """A stand-in for a transformers model, as far as AquaKVPredictors reads one (its config and name)."""
    return SimpleNamespace(config=facts.hf_config, name_or_path=facts.model)


def build_codec(serving: ServingConfig, facts: EngineFacts, rank: int = 0) -> AquaKVCodec:
    """The codec the pages of tensor-parallel rank `rank` hold, checked against the model; AquaKVConfigError naming
    the file and the mismatch."""
    shim = model_shim(facts)
    if serving.method == "higgs" and facts.tensor_parallel_size != 1:
        shim.config = shard_config(facts.hf_config, facts.tensor_parallel_size)
    if serving.method == "higgs":
        try:
            preds = AquaKVPredictors.zeros(shim, serving.bits, grid_dim=serving.grid_dim,
                                           group_size=serving.group_size, seed=serving.seed)
        except ValueError as e:
            raise AquaKVConfigError(f"aquakv (vLLM) higgs: {e}") from None
    else:
        path = os.path.expanduser(serving.predictors)
        if not os.path.isfile(path):
            raise AquaKVConfigError(f"aquakv (vLLM): predictors file {path!r} does not exist (make one with "
                                    f"`aquakv calibrate --out {os.path.basename(path)}`)")
        try:
            preds = AquaKVPredictors.load(path)
            preds.check_compatible(shim)
        except ValueError as e:
            raise AquaKVConfigError(f"aquakv (vLLM): predictors file {path!r}: {e}") from None
        if preds.settings.mixed:
            # A page row holds one code width for keys and values alike (aquakv.vllm.pages.RowLayout); per-layer,
            # per-K/V widths are served by the transformers cache only (docs/vllm.md).
            raise AquaKVConfigError(f"aquakv (vLLM): predictors file {path!r} has per-layer key/value bit widths "
                                    f"(`aquakv calibrate --budget`, format_version 4), which the vLLM plugin does "
                                    f"not serve yet; calibrate with --bits for vLLM")
        try:
            preds = shard_predictors(preds, facts.tensor_parallel_size, rank)
        except ValueError as e:
            raise AquaKVConfigError(f"aquakv (vLLM): predictors file {path!r}: {e}") from None
    if facts.tensor_parallel_size != 1 and preds.settings.group_size > preds.head_dim:
        # A HIGGS group (one Hadamard rotation, one scale) must not straddle two heads, which TP may place apart.
        raise AquaKVConfigError(f"aquakv (vLLM) higgs: group_size {preds.settings.group_size} spans more than one "
                                f"head (head_dim {preds.head_dim}); under tensor parallelism it must be <= head_dim")
    return AquaKVCodec(preds)


def shard_config(hf_config, tensor_parallel_size: int):
    """The config as one tensor-parallel rank sees its KV heads (vLLM splits KV heads evenly, or replicates a head
    when there are fewer heads than ranks)."""
    text = hf_config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    shard = copy.copy(text)
    shard.num_key_value_heads = max(1, kv_heads // tensor_parallel_size)
    shard.num_attention_heads = heads // tensor_parallel_size
    shard.head_dim = head_dim
    return shard
