"""A tiny random-weight Llama for fast tests (shared fixture builder; import it from tests as `tiny_llama`).

Shape: 4 layers, hidden 64, 4 query heads, 2 KV heads (GQA), head_dim 16 -> KV width C = 32, vocab 256.
Weights are drawn with std 0.2 (not the usual 0.02) so attention is far from uniform: a cache that mixes
up positions, rotations or rows changes the logits visibly instead of hiding behind flat softmaxes.
"""
from __future__ import annotations

import torch

TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A deterministic (per seed) tiny LlamaForCausalLM in eval mode on CPU.

    overrides: any LlamaConfig field, e.g. num_key_value_heads=1 (MQA), attention_bias=True (key bias),
    num_hidden_layers=2.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def random_token_windows(count: int, length: int, seed: int = 0, vocab_size: int = TINY_CONFIG["vocab_size"]
                         ) -> list[torch.Tensor]:
    """`count` seeded 1-D LongTensors of `length` ids in [3, vocab_size) (no bos/eos/pad ids)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (length,), generator=gen) for _ in range(count)]
