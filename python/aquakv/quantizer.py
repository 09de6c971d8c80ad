"""HIGGS quantizer: random-sign Hadamard rotation per group, norm scale, nearest Gaussian grid point.

The heavy lifting runs in the fused ops `torch.ops.aquakv.higgs_quantize` / `higgs_dequantize`
(CPU and CUDA kernels); this module only pads, reshapes and keeps the settings together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from aquakv.grids import get_grid

_CODE_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The diagonal D of the random Hadamard transform: float32 [n] of +-1, fixed by the seed.

    Same definition as `aquakv.reference.random_signs` (NumPy's PCG64, platform-independent).
    """
    bits = np.random.default_rng(seed).integers(0, 2, size=n)
    return torch.from_numpy((1.0 - 2.0 * bits).astype(np.float32))


@dataclass(frozen=True)
class HiggsSettings:
    """Everything needed to decode a QuantizedTensor besides its codes and scales."""

    bits: float  # bits per value spent on codes (log2(n) / dim)
    dim: int  # grid dimension d
    group_size: int  # G: values sharing one scale and one Hadamard rotation
    seed: int  # sign seed

    @property
    def n_points(self) -> int:
        return 1 << self.code_bits

    @property
    def code_bits(self) -> int:
        return round(self.bits * self.dim)

    @property
    def bits_per_value(self) -> float:
        """Storage cost per value, scales included: log2(n)/d + 16/G."""
        return self.bits + 16.0 / self.group_size


@dataclass
class QuantizedTensor:
    """HIGGS-quantized tensor of logical shape `shape`.

    codes:  uint8 [rows, C_pad / d * code_bits / 8], the bit-packed grid indices.
    scales: fp16  [rows, C_pad / group_size], the group norms.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    settings: HiggsSettings

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus fp16 scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_value(self) -> float:
        """Measured storage cost, padding included."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device))

    def __repr__(self) -> str:
        s = self.settings
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, bits={s.bits}, dim={s.dim}, "
                f"group_size={s.group_size}, {self.bits_per_value:.3f} bits/value, device={self.device})")


class HiggsQuantizer:
    """HIGGS quantizer with grid (dim, n = 2**(bits*dim)) and groups of `group_size` values.

    >>> q = HiggsQuantizer(bits=2, dim=2, group_size=64)
    >>> x_hat = q.dequantize(q.quantize(x))   # x: [..., C] float -> same shape and dtype
    """

    def __init__(self, bits: float = 2, dim: int = 2, group_size: int = 64, seed: int = 0):
        code_bits = bits * dim
        if abs(code_bits - round(code_bits)) > 1e-9 or round(code_bits) not in _CODE_BITS:
            raise ValueError(f"HiggsQuantizer: bits*dim = {code_bits} must be an integer in {_CODE_BITS} "
                             f"(got bits={bits}, dim={dim})")
        if group_size < 2 or group_size & (group_size - 1):
            raise ValueError(f"HiggsQuantizer: group_size {group_size} is not a power of two")
        if group_size % dim:
            raise ValueError(f"HiggsQuantizer: group_size {group_size} is not a multiple of dim {dim}")
        self.settings = HiggsSettings(bits=round(code_bits) / dim, dim=dim, group_size=group_size, seed=seed)
        self._grid_cpu = get_grid(dim, self.settings.n_points)
        self._signs_cpu = random_signs(group_size, seed)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def bits_per_value(self) -> float:
        return self.settings.bits_per_value

    def _grid_and_signs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._grid_cpu.to(device), self._signs_cpu.to(device))
        return self._on_device[device]

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """x: [..., C] fp32/fp16/bf16 -> QuantizedTensor. C is zero-padded to a multiple of group_size."""
        if not x.is_floating_point() or x.dtype == torch.float64:
            raise TypeError(f"HiggsQuantizer.quantize: x must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("HiggsQuantizer.quantize: x must have at least one dimension")
        group = self.settings.group_size
        rows = x.reshape(-1, x.shape[-1])
        pad = -x.shape[-1] % group
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        grid, signs = self._grid_and_signs(x.device)
        codes, scales = torch.ops.aquakv.higgs_quantize(rows, grid, signs, group)
        # A group with NaN/Inf, or a norm beyond fp16 range, gets a non-finite scale: cheap to check here.
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("HiggsQuantizer.quantize: input has NaN/Inf values or a group norm beyond the fp16 "
                             "range (65504); nothing was quantized")
        return QuantizedTensor(codes, scales, x.shape, x.dtype, self.settings)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """QuantizedTensor -> tensor of qt.shape and qt.dtype on qt's device."""
        if qt.settings != self.settings:
            raise ValueError(f"HiggsQuantizer.dequantize: tensor was quantized with {qt.settings}, "
                             f"this quantizer has {self.settings}")
        grid, signs = self._grid_and_signs(qt.device)
        rows = torch.ops.aquakv.higgs_dequantize(qt.codes, qt.scales, grid, signs, self.settings.group_size, qt.dtype)
        return rows[:, : qt.shape[-1]].reshape(qt.shape)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x): what inference will see after a round trip; same shape and dtype as x."""
        return self.dequantize(self.quantize(x))

    def __repr__(self) -> str:
        s = self.settings
        return (f"HiggsQuantizer(bits={s.bits}, dim={s.dim}, group_size={s.group_size}, seed={s.seed}; "
                f"{s.bits_per_value:.3f} bits/value with scales)")
