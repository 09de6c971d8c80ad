"""Which models the compressed KV caches and their calibration serve, refused up front with the reason otherwise.

A cache that quietly mis-maps a model's keys gives wrong logits, not an error, so what cannot be mapped is refused
when the cache or the calibration is built (docs/model_families.md):

    check_supported(model, who="AquaKVCache")               # config only: instant, no forward
    check_supported(model, who="aquakv.calibrate", probe=True)  # plus one 16-token forward through the model

The config check refuses latent attention (DeepSeek's MLA), state-space and other non-attention layers (Mamba,
Jamba, Zamba, Falcon-H1, Qwen3-Next's linear attention...), encoder-decoder models, and multi-axis RoPE (Qwen2-VL's
mrope). The probe checks what no config says: every decoder layer hands the cache one [B, H_kv, T, head_dim] update
per forward, in layer order, as wide as the config promises; and, for caches that store keys before RoPE, that the
model's rotation is the rotate-half one `aquakv.kv.rope` undoes (layer 0's keys of one repeated token must un-rotate
to one vector whatever the position).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

# Decoder layer types (config.layer_types) whose K/V the cache can hold: dense attention over the past, with or
# without a sliding window (the model's mask applies the window; the cache keeps every token).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Config fields that mark layers which are not all attention (Jamba's "mamba", Zamba's "hybrid", ...).
_BLOCK_TYPE_FIELDS = ("layers_block_type", "block_types", "hybrid_override_pattern", "attn_layer_indices")
_STATE_SPACE_FIELDS = ("mamba_d_state", "ssm_state_size", "mamba_n_heads", "mamba_expand")
# Families whose text model takes 3-axis position ids (temporal, height, width) even when the rope config does not
# name the sections.
_MROPE_TYPES = {"qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text", "qwen2_5_omni", "qwen3_vl",
                "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_omni_moe", "glm4v", "glm4v_text",
                "glm4v_moe", "glm4v_moe_text", "ernie4_5_vl_moe", "glm_ocr", "hunyuan_vl", "glm_image"}
PROBE_TOKENS = 16
_PROBE_TOLERANCE = 0.05  # relative spread of layer 0's un-rotated keys; a wrong rotation convention gives >~0.3


def _model_type(config) -> str:
    return str(getattr(config, "model_type", "") or type(config).__name__)


def _refuse(who: str, config, reason: str) -> ValueError:
    return ValueError(f"{who}: model type {_model_type(config)!r} is not supported: {reason}")


def check_config(config, who: str = "aquakv", pre_rope: bool = True) -> None:
    """Refuse, as a ValueError naming the model type and the reason, a config whose K/V the caches cannot map.

    config: a transformers PretrainedConfig (a multimodal config is judged by its text decoder). pre_rope: the caller
    stores keys before RoPE; multi-axis RoPE is refused only then (post-RoPE keys need no un-rotation).
    """
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(who, config, "encoder-decoder models (T5, BART, Whisper, ...) hold a cross-attention cache of "
                                   "encoder states beside the decoder's self-attention cache; only decoder-only "
                                   "models are served")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for cfg in {id(config): config, id(text): text}.values():
        if getattr(cfg, "kv_lora_rank", None):
            raise _refuse(who, cfg, f"latent attention (MLA, kv_lora_rank={cfg.kv_lora_rank}): keys and values are "
                                    f"decompressed from one shared latent per token and part of each key carries "
                                    f"RoPE separately, so there are no per-head K/V states to predict and quantize")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        mrope = isinstance(rope, dict) and any("mrope" in str(k) or "mrope" in str(v) for k, v in rope.items())
        if pre_rope and (mrope or _model_type(cfg) in _MROPE_TYPES):
            raise _refuse(who, cfg, "multi-axis RoPE (mrope: temporal/height/width position ids) cannot be undone "
                                    "from one position per token, which a pre-RoPE cache stores")
    for name in _BLOCK_TYPE_FIELDS + _STATE_SPACE_FIELDS:
        value = getattr(text, name, None)
        if value is None or value == [] or value == "":
            continue
        if name == "layers_block_type" and all(t == "attention" for t in value):
            continue
        shown = sorted(set(value)) if isinstance(value, (list, tuple)) else value
        raise _refuse(who, text, f"hybrid state-space layers ({name}={shown!r}): their recurrent state is not a "
                                 f"K/V cache")
    types = list(getattr(text, "layer_types", None) or [])
    other = sorted({t for t in types if t not in ATTENTION_LAYER_TYPES})
    if other:
        raise _refuse(who, text, f"layer types {other}: the caches serve {ATTENTION_LAYER_TYPES} layers only "
                                 f"(state-space, convolution and linear-attention layers keep no K/V; chunked or "
                                 f"compressed attention is not mapped)")


class _ProbeCache(DynamicCache):
    """A DynamicCache that also records, per update, the layer index and the shapes it was handed, and layer 0's
    keys."""

    def __init__(self, config):
        super().__init__(config=config)
        self.calls: list[tuple[int, tuple, tuple]] = []
        self.layer0_keys: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.calls.append((layer_idx, tuple(key_states.shape), tuple(value_states.shape)))
        if layer_idx == 0 and self.layer0_keys is None:
            self.layer0_keys = key_states.detach().float()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def _probe(model: nn.Module, who: str, pre_rope: bool) -> None:
    from aquakv.hf_compat import cache_kwargs
    from aquakv.kv.predictors import AquaKVPredictors
    from aquakv.kv.rope import RotaryTracker, unrotate

    config = model.config
    info = AquaKVPredictors.model_info_of(model)
    device = next(model.parameters()).device
    vocab = int(getattr(config.get_text_config(decoder=True), "vocab_size", 4) or 4)
    ids = torch.full((1, PROBE_TOKENS), min(3, vocab - 1), dtype=torch.long, device=device)
    try:
        tracker = RotaryTracker(model) if pre_rope else None
    except ValueError as e:
        raise _refuse(who, config, f"no rotary module to undo RoPE with ({e})") from None
    cache = _ProbeCache(config)
    try:
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        positions = tracker.take(1, PROBE_TOKENS, who) if tracker is not None else None
    finally:
        if tracker is not None:
            tracker.close()
    want = (1, info["num_kv_heads"], PROBE_TOKENS, info["head_dim"])
    order = [layer for layer, _, _ in cache.calls]
    if order != list(range(info["num_layers"])):
        raise _refuse(who, config, f"a forward updated the cache for layers {order}, not once for each of the "
                                   f"{info['num_layers']} decoder layers in order")
    bad = [(layer, k, v) for layer, k, v in cache.calls if k != want or v != want]
    if bad:
        layer, k, v = bad[0]
        raise _refuse(who, config, f"layer {layer} hands the cache keys {k} and values {v}, but the config's K/V "
                                   f"layout is [batch, {want[1]} kv heads, tokens, head_dim {want[3]}]")
    if tracker is None:
        return
    keys = unrotate(cache.layer0_keys, *tracker.cos_sin(positions, 0))  # [1, H, T, D]: one vector if RoPE undone
    ref = keys[:, :, :1]
    scale = ref.norm()
    if scale > 0:
        spread = ((keys - ref).flatten(2).norm(dim=(0, 1)) / scale).max().item()
        if spread > _PROBE_TOLERANCE:
            raise _refuse(who, config, f"its rotary embedding is not the rotate-half RoPE the cache undoes (layer 0's "
                                       f"keys of one repeated token differ by {spread:.2f} across positions after "
                                       f"un-rotation; interleaved RoPE, as in Cohere or GPT-J, is not supported "
                                       f"before RoPE): use a post-RoPE cache (pre_rope=False)")


def check_supported(model: nn.Module, *, who: str = "aquakv", probe: bool = False, pre_rope: bool = True) -> None:
    """Refuse a model whose K/V the caches cannot map, with a ValueError naming the model type and the reason.

    who: the caller named in the message (e.g. "AquaKVCache", "aquakv.calibrate").
    probe: also run one forward of PROBE_TOKENS tokens through the model (see the module docstring): cheap beside a
    calibration, which runs the model anyway; the cache constructor checks the config only.
    pre_rope: the caller stores keys before RoPE (the probe then checks the rotation convention too).
    """
    check_config(model.config, who, pre_rope)
    if probe:
        _probe(model, who, pre_rope)
