"""Blockwise attention over a compressed cache: the keys and values of the quantized tokens are rebuilt one
block of tokens at a time and merged with an online softmax (as flash-decoding does), so a forward never holds a
whole layer's reconstruction in the model's dtype, a re-rotated copy of it, or the [Q, T] scores of all tokens.

How it plugs into transformers: `install(model)` registers the attention function `NAME` (and its mask, a
boolean [B, 1, Q, T] mask that is always materialized) and switches the model to it. A `ChunkedKVCache` built
with attention="blockwise" then returns from `update` only the exact tokens (sinks and buffer), the keys carrying a
`DeferredLayer` (`defer`) that this function consumes; without one (another cache, no cache) it is plain SDPA.
The cache checks the model's attention implementation at every update, so a model switched back to SDPA gets
the whole materialized cache again: never partial keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

NAME = "aquakv_blockwise"

Block = tuple[int, int, torch.Tensor, torch.Tensor]  # (start, stop, keys, values) of the quantized tokens


@dataclass
class DeferredLayer:
    """What one layer's attention reads besides the exact tensors `update` returned.

    exact_keys / exact_values: [B, H, S + N, D] the sinks (S tokens) then the buffer (N tokens).
    blocks(): yields the quantized tokens [start, stop) of the region between sinks and buffer as
    (start, stop, keys post-RoPE, values) [B, H, stop - start, D] in the model's dtype, block by block.
    """

    layer_idx: int
    exact_keys: torch.Tensor
    exact_values: torch.Tensor
    num_sinks: int
    num_quantized: int
    blocks: Callable[[], Iterator[Block]] | None
    consumed: bool = False


# The one seam between the cache and this attention function: the key tensor `update` returns carries the layer's
# DeferredLayer as this attribute, and only that tensor (transformers hands the attention function the very tensor
# the cache returned). Nothing global, nothing per thread: two models, or two threads, cannot see each other's.
_CARRIED = "aquakv_deferred"


def defer(keys: torch.Tensor, layer: DeferredLayer) -> DeferredLayer:
    """Attach `layer` to the exact keys `update` is about to return (their attention reads it); returns it."""
    setattr(keys, _CARRIED, layer)
    return layer


def deferred_of(keys: torch.Tensor) -> DeferredLayer | None:
    """The DeferredLayer the keys carry, once: taken off them (None for keys of any other origin)."""
    layer = getattr(keys, _CARRIED, None)
    if layer is not None:
        delattr(keys, _CARRIED)
    return layer


def _mask_columns(mask: torch.Tensor | None, start: int, stop: int, q_len: int, kv_len: int,
                  device: torch.device) -> torch.Tensor | None:
    """The [B or 1, 1 or H, Q, stop - start] part of the mask for key columns [start, stop) of kv_len; without a
    mask, the causal one (query i sits at column kv_len - q_len + i)."""
    if mask is not None:
        return mask[..., start:stop]
    rows = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    cols = torch.arange(start, stop, device=device).unsqueeze(0)
    return (cols <= rows).view(1, 1, q_len, stop - start)


class _OnlineSoftmax:
    """softmax(q k^T * scale + mask) v accumulated block by block in float32.

    query [B, Hq, Q, D]; key blocks [B, Hkv, T_b, D] with Hq = G * Hkv (query head h reads KV head h // G, as
    repeat_kv lays them out), so no repeated copy of the keys is made.
    """

    def __init__(self, query: torch.Tensor, num_kv_heads: int, scaling: float):
        b, hq, q, d = query.shape
        if hq % num_kv_heads:
            raise ValueError(f"blockwise attention: {hq} query heads are not a multiple of {num_kv_heads} KV heads")
        self.shape = (b, num_kv_heads, hq // num_kv_heads, q)
        self.q = (query.float() * scaling).reshape(b, num_kv_heads, -1, d)  # [B, Hkv, G*Q, D]
        self.max = query.new_full((*self.shape, 1), -torch.inf, dtype=torch.float32)
        self.sum = query.new_zeros((*self.shape, 1), dtype=torch.float32)
        self.acc = query.new_zeros((*self.shape, d), dtype=torch.float32)
        # In place unless autograd records the merge (a forward outside no_grad): then the same operations, out of
        # place, so that backward finds what it saved; the numbers are the same either way.
        self.inplace = not (torch.is_grad_enabled() and query.requires_grad)

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Merge one block: keys, values [B, Hkv, T, D]; mask [B|1, 1|H, Q, T] (bool: True attends; or additive).
        The scores are the one [G*Q, T] tensor per KV head a block costs: masked, shifted and exponentiated in
        place."""
        b, hkv, g, q = self.shape
        t = keys.shape[2]
        if t == 0:
            return
        scores = torch.matmul(self.q, keys.float().transpose(-1, -2)).view(b, hkv, g, q, t)
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1, 1, q, t)  # [B|1, 1|Hkv, 1, Q, T]
            if mask.shape[1] not in (1, hkv):  # a per-query-head mask: group it like the queries
                mask = mask.reshape(mask.shape[0], hkv, g, q, t)
            if mask.dtype == torch.bool:
                fill = scores.masked_fill_ if self.inplace else scores.masked_fill
                scores = fill(~mask, -torch.inf)
            else:
                scores = scores.add_(mask) if self.inplace else scores + mask
        new_max = torch.maximum(self.max, scores.amax(dim=-1, keepdim=True))
        # Rows that have seen only masked columns keep max = -inf; shift them by 0 so exp gives 0, not NaN.
        shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
        probs = scores.sub_(shift).exp_() if self.inplace else (scores - shift).exp()
        rescale = torch.exp(self.max - shift)
        weighted = torch.matmul(probs.view(b, hkv, g * q, t), values.float()).view(b, hkv, g, q, -1)
        if self.inplace:
            self.sum.mul_(rescale).add_(probs.sum(dim=-1, keepdim=True))
            self.acc.mul_(rescale).add_(weighted)
        else:
            self.sum = self.sum * rescale + probs.sum(dim=-1, keepdim=True)
            self.acc = self.acc * rescale + weighted
        self.max = new_max

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, Q, Hq, D] (the layout attention functions return); fully masked rows give zeros."""
        b, hkv, g, q = self.shape
        out = self.acc / torch.where(self.sum > 0, self.sum, torch.ones_like(self.sum))
        return out.view(b, hkv * g, q, -1).transpose(1, 2).to(dtype).contiguous()


def attend(query: torch.Tensor, layer: DeferredLayer, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] over sinks | quantized blocks | buffer of one layer -> [B, Q, Hq, D]."""
    s, n_quant = layer.num_sinks, layer.num_quantized
    n_exact = layer.exact_keys.shape[2]
    kv_len, q_len = n_exact + n_quant, query.shape[2]
    merge = _OnlineSoftmax(query, layer.exact_keys.shape[1], scaling)
    dev = query.device
    merge.add(layer.exact_keys[:, :, :s], layer.exact_values[:, :, :s], _mask_columns(mask, 0, s, q_len, kv_len, dev))
    for start, stop, keys, values in layer.blocks():
        merge.add(keys, values, _mask_columns(mask, s + start, s + stop, q_len, kv_len, dev))
    merge.add(layer.exact_keys[:, :, s:], layer.exact_values[:, :, s:],
              _mask_columns(mask, s + n_quant, kv_len, q_len, kv_len, dev))
    layer.consumed, layer.blocks = True, None
    return merge.result(query.dtype)


def blockwise_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs):
    """The attention function registered as NAME: blockwise over a deferred layer, else transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = deferred_of(key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # A sliding window lives in the mask transformers builds for the layer; without a mask it would be lost.
    refused = ("softcap", "s_aux") + (("sliding_window",) if attention_mask is None else ())
    unsupported = {k: kwargs[k] for k in refused if kwargs.get(k) is not None}
    if dropout or unsupported:
        layer.consumed = False  # the cache will say the attention did not read its tokens
        raise NotImplementedError(f"blockwise attention (layer {layer.layer_idx}) does not support "
                                  f"{'dropout' if dropout else ', '.join(unsupported)}; use attention='materialize'")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return attend(query, layer, attention_mask, scaling), None


def _mask(*args, **kwargs):
    """SDPA's boolean mask, always materialized: the causal skip would hand us no mask for the exact buffer."""
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)


_registered = False


def install(model) -> str:
    """Register NAME with transformers (once) and switch `model` to it; returns the implementation it had.

    Only models on SDPA or eager attention are switched (NAME falls back to SDPA when no cache defers to it);
    anything else (flash attention, flex, a custom kernel) is refused.
    """
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not _registered:
        AttentionInterface.register(NAME, blockwise_attention)
        AttentionMaskInterface.register(NAME, _mask)
        _registered = True
    before = model.config._attn_implementation
    if before == NAME:
        return before
    if before not in ("sdpa", "eager"):
        raise ValueError(f"attention='blockwise' replaces SDPA or eager attention; this model uses {before!r}: pass "
                         f"attention='materialize'")
    model.set_attn_implementation(NAME)
    return before


def is_installed(config) -> bool:
    """Whether a model with this config runs NAME (checked at every update of a blockwise cache)."""
    return getattr(config, "_attn_implementation", None) == NAME
