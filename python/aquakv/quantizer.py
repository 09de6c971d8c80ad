"""HIGGS quantizer: random-sign Hadamard rotation per group, norm scale, nearest Gaussian grid point.

The heavy lifting runs in the fused ops `torch.ops.aquakv.higgs_quantize` / `higgs_dequantize`
(CPU and CUDA kernels); this module only pads, reshapes and keeps the settings together.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from aquakv import ops
from aquakv.grids import get_grid
from aquakv.ops_checks import check_group_size

_CODE_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
_FP16_TINY = 2.0 ** -14  # smallest normal float16: a smaller nonzero scale loses precision or becomes 0
_LOGICAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GridSpec(NamedTuple):
    """A HIGGS grid: n points in dim dimensions. A tuple, so GridSpec(2, 16) == (2, 16).

    Vocabulary used everywhere in Python: `bits` is bits per value (log2(n) / dim); `code_bits` is the width of
    one packed code, i.e. bits per dim-dimensional sub-vector (log2(n)).
    """

    dim: int
    n: int

    @property
    def code_bits(self) -> int:
        return round(math.log2(self.n))

    @property
    def bits(self) -> float:
        return math.log2(self.n) / self.dim


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


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
    def grid(self) -> GridSpec:
        return GridSpec(self.dim, self.n_points)

    @property
    def bits_per_value(self) -> float:
        """Storage cost per value, scales included: log2(n)/d + 16/G."""
        return self.bits + 16.0 / self.group_size


@dataclass
class QuantizedTensor:
    """HIGGS-quantized tensor of logical shape `shape`.

    codes:  uint8 [rows, C_pad / d * code_bits / 8], the bit-packed grid indices.
    scales: fp16  [rows, C_pad / group_size], the group norms.
    dtype:  the logical dtype that dequantize returns; codes and scales keep their own dtypes whatever it is.
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
        """Bytes of memory held: the storages under codes and scales, each counted once. A view into a larger
        buffer holds that whole buffer, so it counts it (see `bits_per_value` for the format's own cost)."""
        seen, total = set(), 0
        for t in (self.codes, self.scales):
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        return total

    @property
    def payload_bytes(self) -> int:
        """Bytes of the format itself: packed codes plus fp16 scales of this tensor (views count their own part)."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_value(self) -> float:
        """Storage cost of the format, padding included (codes + scales of this tensor per logical value)."""
        return 8.0 * self.payload_bytes / max(self.numel, 1)

    def to(self, *args, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None
           ) -> "QuantizedTensor":
        """Like Tensor.to, for a device and/or a dtype (positionally or by keyword). A device moves codes and
        scales; a dtype only changes the logical dtype that dequantize returns (float32/float16/bfloat16).
        The codes and scales are never converted: they are the format."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg if dtype is None else _too_many("dtype")
            elif isinstance(arg, (torch.device, str, int)) and not isinstance(arg, bool):
                device = arg if device is None else _too_many("device")
            else:
                raise TypeError(f"QuantizedTensor.to: expected a device or a dtype, got {arg!r}")
        if dtype is not None and dtype not in _LOGICAL_DTYPES:
            raise TypeError(f"QuantizedTensor.to: the logical dtype must be one of {_LOGICAL_DTYPES}, got {dtype}")
        moved = self if device is None else replace(self, codes=self.codes.to(device), scales=self.scales.to(device))
        return moved if dtype is None else replace(moved, dtype=dtype)

    def __repr__(self) -> str:
        s = self.settings
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, bits={s.bits}, dim={s.dim}, "
                f"group_size={s.group_size}, {self.bits_per_value:.3f} bits/value, device={self.device})")


def _too_many(what: str):
    raise TypeError(f"QuantizedTensor.to: {what} given twice")


class HiggsQuantizer:
    """HIGGS quantizer with grid (dim, n = 2**(bits*dim)) and groups of `group_size` values.

    >>> q = HiggsQuantizer(bits=2, dim=2, group_size=64)
    >>> x_hat = q.dequantize(q.quantize(x))   # x: [..., C] float -> same shape and dtype
    """

    def __init__(self, bits: float = 2, dim: int = 2, group_size: int = 64, seed: int = 0):
        # Every check runs before anything is allocated (random_signs is [group_size]).
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"HiggsQuantizer: dim must be a positive integer, got {dim!r}")
        if (not isinstance(bits, numbers.Real) or isinstance(bits, bool)
                or not (isinstance(bits, numbers.Integral) or math.isfinite(bits)) or not -64 <= bits <= 64):
            raise ValueError(f"HiggsQuantizer: bits must be a finite number of bits per value, got {bits!r}")
        code_bits = bits * dim
        if abs(code_bits - round(code_bits)) > 1e-9 or round(code_bits) not in _CODE_BITS:
            raise ValueError(f"HiggsQuantizer: bits*dim = {code_bits} must be an integer in {_CODE_BITS} "
                             f"(got bits={bits}, dim={dim})")
        if not _is_int(group_size):
            raise ValueError(f"HiggsQuantizer: group_size {group_size!r} must be an integer")
        check_group_size(group_size, dim, round(code_bits), op="HiggsQuantizer")
        if not _is_int(seed) or not 0 <= seed < 2 ** 63:  # int64 range: HiggsLinear keeps it in a buffer
            raise ValueError(f"HiggsQuantizer: seed must be an integer in 0..2**63-1, got {seed!r}")
        self.settings = HiggsSettings(bits=round(code_bits) / dim, dim=dim, group_size=int(group_size), seed=int(seed))
        self._grid_cpu = get_grid(dim, self.settings.n_points)
        self._signs_cpu = random_signs(group_size, seed)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def bits_per_value(self) -> float:
        return self.settings.bits_per_value

    def grid_and_signs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid [n, d] float32, signs [group_size] float32) on `device`, as the fused ops take them (kept per
        device): for callers that run `aquakv.ops` on this quantizer's codes themselves."""
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
        rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: a last dim of 0 cannot infer it
        if x.shape[-1] == 0:  # nothing to code: empty codes and scales, dequantize gives the empty tensor back
            empty = rows.new_empty((rows.shape[0], 0), dtype=torch.uint8)
            return QuantizedTensor(empty, empty.to(torch.float16), x.shape, x.dtype, self.settings)
        pad = -x.shape[-1] % group
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        grid, signs = self.grid_and_signs(x.device)
        codes, scales = torch.ops.aquakv.higgs_quantize(rows, grid, signs, group)
        # One cheap check (scales are 1/G of the input), one sync: a scale that is not a normal fp16 number means
        # NaN/Inf input, a norm beyond 65504, or a tiny norm whose fp16 scale underflowed; zero groups are fine.
        suspect = ~torch.isfinite(scales) | (scales < _FP16_TINY)
        if bool(suspect.any()):
            _check_scales(rows, scales, suspect, group)
        return QuantizedTensor(codes, scales, x.shape, x.dtype, self.settings)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """QuantizedTensor -> tensor of qt.shape and qt.dtype on qt's device."""
        if qt.settings != self.settings:
            raise ValueError(f"HiggsQuantizer.dequantize: tensor was quantized with {qt.settings}, "
                             f"this quantizer has {self.settings}")
        if qt.shape[-1] == 0:
            return torch.empty(qt.shape, dtype=qt.dtype, device=qt.device)
        grid, signs = self.grid_and_signs(qt.device)
        rows = torch.ops.aquakv.higgs_dequantize(qt.codes, qt.scales, grid, signs, self.settings.group_size, qt.dtype)
        return rows[:, : qt.shape[-1]].reshape(qt.shape)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x): what inference will see after a round trip; same shape and dtype as x."""
        return self.dequantize(self.quantize(x))

    def __repr__(self) -> str:
        s = self.settings
        return (f"HiggsQuantizer(bits={s.bits}, dim={s.dim}, group_size={s.group_size}, seed={s.seed}; "
                f"{s.bits_per_value:.3f} bits/value with scales)")


def _check_scales(rows: torch.Tensor, scales: torch.Tensor, suspect: torch.Tensor, group: int) -> None:
    """Raise for a scale the fp16 format cannot hold; rows [R, C_pad] are the quantized input, scales [R, C_pad/G]."""
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("HiggsQuantizer.quantize: input has NaN/Inf values or a group norm beyond the fp16 "
                         "range (65504); nothing was quantized")
    norms = rows.reshape(rows.shape[0], -1, group)[suspect].float().norm(dim=-1)
    tiny = norms[(norms > 0) & (norms < _FP16_TINY * 1.001)]  # the op's fp32 norm may round a hair differently
    if tiny.numel():
        raise ValueError(f"HiggsQuantizer.quantize: a group norm of {float(tiny.min()):.3g} is below the smallest "
                         f"normal float16 ({_FP16_TINY:.3g}); its fp16 scale would lose precision or underflow to 0. "
                         f"Group norms must be 0 or in [{_FP16_TINY:.3g}, 65504]: rescale the input; nothing was "
                         f"quantized")
