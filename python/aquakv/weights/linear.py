"""HiggsLinear: a linear layer whose weight is stored HIGGS-quantized and served from its codes.

Weight layout (row-aligned, weights file format v2): every group of G values lies inside one row of W [out, in],
so that `torch.ops.aquakv.higgs_linear` can rotate x once per group and read only codes. The group size a layer
asks for is a cap; the layer uses `row_group_size(in, G, d, n)`:
  * the largest power of two g <= G that divides `in`, is >= MIN_ROW_GROUP and passes the HIGGS group-size rule
    (SmolLM2's in = 576 with G = 256 gets g = 64: 0.25 bits of scale per value instead of 0.0625, where padding
    each row to 768 would cost a third more codes);
  * otherwise (in has no such divisor, e.g. an odd in) G itself, each row zero-padded to a multiple of G.
Format v1 let a group run onto the next row when in % G != 0; such layers cannot be served from codes and
are refused on load with the command that re-quantizes them (weights/checkpoint.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aquakv.quantizer import GridSpec, HiggsQuantizer, QuantizedTensor

DEFAULT_GROUP_SIZE = 256
MIN_ROW_GROUP = 32  # below this the fp16 scales cost more than half a bit per value: pad rows instead


def row_group_size(in_features: int, group_size: int, dim: int, n_points: int) -> tuple[int, int]:
    """(G used, padded in) of a layer with `in_features` inputs asking for `group_size` (rule in the module doc)."""
    code_bits = round(math.log2(n_points))
    g = group_size
    while g >= dim and (g == group_size or g >= MIN_ROW_GROUP):
        if in_features % g == 0 and g % dim == 0 and (g // dim * code_bits) % 8 == 0:
            return g, in_features
        g //= 2
    return group_size, -(-in_features // group_size) * group_size


def grid_bits(dim: int, n_points: int) -> float:
    """Bits per value of a grid of n_points in dim dimensions: log2(n) / d (= GridSpec(dim, n_points).bits)."""
    return GridSpec(dim, n_points).bits


def higgs_weight_cost(numel: int, dim: int, n_points: int, group_size: int, in_features: int | None = None) -> int:
    """Storage in bits of a [numel] weight quantized with grid (dim, n_points): codes + fp16 scales, padding included.
    With in_features, the row-aligned layout HiggsLinear uses (row_group_size); without, whole groups of numel."""
    if in_features is not None:
        group, padded = row_group_size(in_features, group_size, dim, n_points)
        groups = numel // in_features * padded // group
        return groups * (group // dim * round(math.log2(n_points)) + 16)
    groups = -(-numel // group_size)
    return groups * (group_size // dim * round(math.log2(n_points)) + 16)


class HiggsLinear(nn.Module):
    """y = x @ W_hat^T + b with W_hat the HIGGS dequantization of the stored codes, computed from the codes by
    `torch.ops.aquakv.higgs_linear` (no float weight is built; see docs/weights.md for its speed).

    Buffers (move with `.to()`/`.cuda()`; saved by `state_dict`), G = the row-aligned group size (module doc):
      codes:  uint8 [out * in_padded / G, G / d * log2(n) / 8], bit-packed grid indices, row after row.
      scales: fp16  [out * in_padded / G, 1], the group norms. Dtype casts of the module (`.half()`,
              `.to(torch.bfloat16)`) never touch them: they stay the exact fp16 values that were stored.
      higgs_config: int64 [6] = (d, n, G, seed, out, in), what the codes mean. `load_state_dict` refuses a
              state whose config differs (same-shaped codes of another grid or seed would decode to garbage).
    The output has the dtype of the input; x is cast to the layer's compute dtype (that of the original layer,
    following `.to(dtype)` of the module) first. `dequantize_weight()` gives W_hat for inspection or fine-tuning;
    `cache_weight=True` keeps it after the first call (it costs the float weight's memory; forward never uses it).
    """

    def __init__(self, in_features: int, out_features: int, *, dim: int, n_points: int,
                 group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 cache_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        group_size, self.in_padded = row_group_size(in_features, group_size, dim, n_points)
        self.quantizer = HiggsQuantizer(bits=grid_bits(dim, n_points), dim=dim, group_size=group_size, seed=seed)
        settings = self.quantizer.settings
        rows = out_features * self.in_padded // group_size
        row_bytes = group_size // dim * settings.code_bits // 8
        self.register_buffer("codes", torch.zeros(rows, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(rows, 1, dtype=torch.float16, device=device))
        config = (dim, n_points, group_size, seed, out_features, in_features)
        self.register_buffer("higgs_config", torch.tensor(config, dtype=torch.int64, device=device))
        # A zero-size float buffer that module dtype casts convert: it records the compute dtype.
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.cache_weight = cache_weight
        self._cached: torch.Tensor | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: float | None = None, dim: int = 2, n_points: int | None = None,
                    group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0, cache_weight: bool = False) -> "HiggsLinear":
        """Quantize `linear.weight` (data-free). Give either `bits` (bits per value, n = 2**(bits*dim))
        or `n_points`. The result lives on the linear's device with its dtype."""
        if (bits is None) == (n_points is None):
            raise ValueError("HiggsLinear.from_linear: give exactly one of bits= or n_points=")
        if n_points is None:
            n_points = 1 << round(bits * dim)
            if abs(math.log2(n_points) - bits * dim) > 1e-9:
                raise ValueError(f"HiggsLinear.from_linear: bits*dim = {bits * dim} is not an integer (bits={bits}, dim={dim})")
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, dim=dim, n_points=n_points, group_size=group_size,
                     seed=seed, bias=linear.bias is not None, dtype=weight.dtype, device=weight.device,
                     cache_weight=cache_weight)
        qt = module.quantizer.quantize(module.weight_groups(weight.float()))
        module.codes.copy_(qt.codes)
        module.scales.copy_(qt.scales)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def weight_groups(self, weight: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [out * in_padded / G, G]: the groups of this layer's layout (rows zero-padded if needed)."""
        return flat_groups(F.pad(weight, (0, self.in_padded - self.in_features)), self.group_size)

    # ---- state dict -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked before anything is copied, so a refused state leaves the layer as it was.
        stored = state_dict.get(prefix + "higgs_config")
        if stored is not None:
            ok = isinstance(stored, torch.Tensor) and stored.shape == (6,) and not stored.is_floating_point()
            if not ok or stored.tolist() != self.higgs_config.tolist():
                have = _describe_config(self.higgs_config.tolist())
                got = _describe_config(stored.tolist()) if ok else repr(stored)
                raise ValueError(f"HiggsLinear.load_state_dict: {prefix + 'higgs_config'} says the codes are {got}, "
                                 f"but this layer is {have}; build the layer with the stored settings")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- properties -------------------------------------------------------------------------
    @property
    def grid(self) -> GridSpec:
        return self.quantizer.settings.grid

    @property
    def dim(self) -> int:
        return self.quantizer.settings.dim

    @property
    def n_points(self) -> int:
        return self.quantizer.settings.n_points

    @property
    def group_size(self) -> int:
        return self.quantizer.settings.group_size

    @property
    def seed(self) -> int:
        return self.quantizer.settings.seed

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    @property
    def weight_bits(self) -> int:
        """Bits held by codes and scales (bias excluded)."""
        return 8 * (self.codes.numel() + self.scales.numel() * 2)

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / (self.in_features * self.out_features)

    def quantized_tensor(self) -> QuantizedTensor:
        """The stored weight as a QuantizedTensor of logical shape [rows, G] (flattened groups)."""
        shape = torch.Size([self.codes.shape[0], self.group_size])
        return QuantizedTensor(self.codes, self.scales, shape, torch.float32, self.quantizer.settings)

    # ---- compute -------------------------------------------------------------------------
    @torch.no_grad()
    def dequantize_weight(self) -> torch.Tensor:
        """W_hat: [out, in] in the compute dtype, on the module's device."""
        if self._cached is not None:
            return self._cached
        rows = self.quantizer.dequantize(self.quantized_tensor()).reshape(self.out_features, self.in_padded)
        weight = rows[:, : self.in_features].to(self.compute_dtype).contiguous()
        if self.cache_weight:
            self._cached = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out] in the compute dtype, from the codes (torch.ops.aquakv.higgs_linear)."""
        x = x.to(self.compute_dtype)
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        grid, signs = self.quantizer.grid_and_signs(self.codes.device)
        return torch.ops.aquakv.higgs_linear(x, self.codes.view(self.out_features, -1),
                                             self.scales.view(self.out_features, -1), grid, signs, self.group_size,
                                             self.bias)

    def clear_cache(self) -> None:
        self._cached = None

    def _apply(self, fn, recurse: bool = True):
        scales = self.scales
        super()._apply(fn, recurse)
        # The stored norms are fp16 by format: keep them bit-exact whatever float dtype the module is cast to.
        self.scales = scales.to(self.codes.device)
        self._cached = None
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"grid=(d={self.dim}, n={self.n_points}), group_size={self.group_size}, seed={self.seed}, "
                f"{self.bits_per_weight:.4f} bits/weight, dtype={self.compute_dtype}")


def _describe_config(config: list[int]) -> str:
    dim, n, group, seed, out_features, in_features = config
    return f"grid (d={dim}, n={n}), group_size {group}, seed {seed}, shape [{out_features}, {in_features}]"


def flat_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [ceil(out*in / G), G], row-major, zero-padded at the tail (with G from row_group_size, or a
    weight padded by HiggsLinear.weight_groups, no group crosses a row)."""
    flat = weight.reshape(-1)
    pad = -flat.numel() % group_size
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, group_size)


@torch.no_grad()
def higgs_quantize_dequantize_weight(weight: torch.Tensor, *, dim: int, n_points: int,
                                     group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0) -> torch.Tensor:
    """What HiggsLinear would serve for `weight` [out, in], without building a module: same shape and dtype
    (row-aligned groups, as HiggsLinear lays them out)."""
    out_features, in_features = weight.shape
    group_size, padded = row_group_size(in_features, group_size, dim, n_points)
    q = HiggsQuantizer(bits=grid_bits(dim, n_points), dim=dim, group_size=group_size, seed=seed)
    rows = F.pad(weight.detach().float(), (0, padded - in_features))
    deq = q.quantize_dequantize(flat_groups(rows, group_size)).reshape(out_features, padded)
    return deq[:, :in_features].to(weight.dtype)
