"""The rotary tables of the model vLLM serves, as `aquakv.kv.rope` takes them: cos and sin [T, R] of given positions.

They come from vLLM's own rotary module for the model's RoPE settings (`get_rope`, the same call the served
architectures make), evaluated in float32, so the keys are un-rotated with exactly the rotation vLLM applied.
"""
from __future__ import annotations

import torch


def rope_tables(model_config, head_dim: int):
    from vllm.model_executor.layers.rotary_embedding import get_rope

    cfg = model_config.hf_config.get_text_config(decoder=True)
    rotary = get_rope(head_dim, max_position=model_config.max_model_len + 2048,  # + pages past the end
                      rope_parameters=getattr(cfg, "rope_parameters", None), is_neox_style=True,
                      dtype=torch.float32)
    cache = rotary.cos_sin_cache.float()  # [max_position, R]: cos of R/2 frequencies, then their sin
    half = cache.shape[1] // 2

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = cache.index_select(0, positions)
        cos, sin = rows[:, :half], rows[:, half:]
        return torch.cat([cos, cos], 1), torch.cat([sin, sin], 1)
    return tables
