"""Round-to-nearest uniform quantization: the baseline every user knows.

Asymmetric min/max per group of `group_size` consecutive weights (the same flattened row-major groups as
HiggsLinear, so both methods see identical groups), with the package's one uniform quantizer
(`aquakv.uniform`): scale = (max - min) / (2**bits - 1) and the minimum, both stored in fp16 (32 bits per
group), codes q = round((w - min) / scale) in [0, 2**bits - 1].
Cost: bits + 32 / group_size bits per weight.
"""
from __future__ import annotations

import torch
from torch import nn

from aquakv.progress import progress as progress_bar
from aquakv.uniform import uniform_codes, uniform_decode
from aquakv.weights.linear import DEFAULT_GROUP_SIZE, flat_groups
from aquakv.weights.quantize import quantizable_linears


def rtn_bits_per_weight(bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    return bits + 32.0 / group_size


@torch.no_grad()
def rtn_quantize_dequantize(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """weight: any shape (groups run over the flattened tensor) -> RTN round trip, same shape and dtype."""
    if not 1 <= bits <= 16:
        raise ValueError(f"rtn_quantize_dequantize: bits must be in 1..16, got {bits}")
    if group_size < 1:
        raise ValueError(f"rtn_quantize_dequantize: group_size must be positive, got {group_size}")
    groups = flat_groups(weight.detach().float(), group_size)
    # The padded tail must not widen the last group's range: pad with that group's own first value.
    pad = groups.numel() - weight.numel()
    if pad:
        groups = groups.clone()
        groups[-1, group_size - pad:] = groups[-1, 0]
    codes, scale, minimum = uniform_codes(groups, bits)  # a constant group decodes exactly to its fp16 minimum
    w_hat = uniform_decode(codes, scale, minimum)
    return w_hat.reshape(-1)[: weight.numel()].view(weight.shape).to(weight.dtype)


@torch.no_grad()
def rtn_quantize_model(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE, include_lm_head: bool = False,
                       progress: bool = True) -> nn.Module:
    """Overwrite every quantizable linear weight with its RTN round trip, in place (a simulation: weights stay
    dense floats; the cost they would take is `rtn_bits_per_weight(bits, group_size)`). Returns the model."""
    layers = quantizable_linears(model, include_lm_head)
    for linear in progress_bar(layers.values(), desc=f"RTN {bits}-bit", enabled=progress, unit="layer"):
        # A new Parameter, not `.data =`: a head tied to the input embedding must not overwrite the embedding.
        linear.weight = nn.Parameter(rtn_quantize_dequantize(linear.weight, bits, group_size), requires_grad=False)
    return model
