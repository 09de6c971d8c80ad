"""The quantizer settings AQUA-KV predictors are calibrated with and the cache quantizes with (plain data: the
predictors and their file both read them, neither through the other)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from aquakv.quantizer import HiggsQuantizer

PARTS = ("keys", "values")


@dataclass(frozen=True)
class AquaKVSettings:
    """Quantizer settings shared by calibration and the cache.

    bits: bits per value (log2(n) / grid_dim) for layers >= 1 (HIGGS grid (grid_dim, n = 2**(bits*grid_dim))).
    layer0_bits: bits per value for layer 0 (the first compressed layer: it has nothing to be predicted from), or
      None to keep it in fp16 (no quantization).
    group_size: HIGGS group (values sharing a scale and a Hadamard rotation); defaults to head_dim.
    Per-layer widths live in the subclass `LayerWidthSettings`; here key_bits and value_bits are class attributes,
    not fields, so a uniform settings' asdict (what the predictors file stores) is what it always was.
    """

    bits: float
    grid_dim: int
    group_size: int
    seed: int
    layer0_bits: float | None
    key_bits = None  # no per-layer widths: `bits` everywhere (LayerWidthSettings has them)
    value_bits = None

    @property
    def mixed(self) -> bool:
        """Whether widths vary per layer or between keys and values (format_version 4 files)."""
        return self.key_bits is not None

    def quantizer_for(self, chain_start: bool, layer: int | None = None, part: str = "keys") -> HiggsQuantizer | None:
        """The residual quantizer of the first compressed layer (chain_start) or of `layer`'s keys or values; None
        means the part is stored in fp16."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if chain_start:
            bits = self.layer0_bits
        elif self.key_bits is None or layer is None:
            bits = self.bits
        else:
            bits = (self.key_bits if part == "keys" else self.value_bits)[layer]
            if bits is None:
                raise ValueError(f"settings.{part[:-1]}_bits[{layer}] is null, but layer {layer} is predicted")
        if bits is None:
            return None
        return HiggsQuantizer(bits=bits, dim=self.grid_dim, group_size=self.group_size, seed=self.seed)


@dataclass(frozen=True)
class LayerWidthSettings(AquaKVSettings):
    """AquaKVSettings with per-layer widths chosen by the bit allocation (aquakv.kv.bit_allocation; format_version 4).

    key_bits, value_bits: one entry per layer, the bits per value of that layer's keys (values) where the layer is
    predicted, None at the chain start (it keeps layer0_bits) and at layers kept exact. They replace `bits`, which
    stays as the width the allocation's reference pass used.
    """

    key_bits: tuple[float | None, ...] = ()
    value_bits: tuple[float | None, ...] = ()


def with_widths(settings: AquaKVSettings, key_bits: Sequence[float | None], value_bits: Sequence[float | None]
                ) -> AquaKVSettings:
    """The settings with per-layer widths; uniform widths equal to settings.bits collapse to no widths, so such a
    file is written exactly as a uniform one."""
    from dataclasses import fields

    base = {f.name: getattr(settings, f.name) for f in fields(AquaKVSettings)}
    kb, vb = tuple(key_bits), tuple(value_bits)
    if all(b is None or b == settings.bits for b in kb + vb):
        return AquaKVSettings(**base)
    return LayerWidthSettings(**base, key_bits=kb, value_bits=vb)


def check_widths(settings: AquaKVSettings, sources: Sequence[int | None], exact: Sequence[int]) -> None:
    """Refuse per-layer widths that do not fit the layers (`sources[l]`: the layer l is predicted from, None at the
    chain start; `exact`: layers kept exact): ValueError naming the field, e.g. 'settings.key_bits[3]'."""
    kb, vb = settings.key_bits, settings.value_bits
    if (kb is None) != (vb is None):
        raise ValueError("settings.key_bits and settings.value_bits: give both per-layer lists or neither")
    if kb is None:
        return
    exact = set(exact)
    for name, widths in (("key_bits", kb), ("value_bits", vb)):
        if len(widths) != len(sources):
            raise ValueError(f"settings.{name}: {len(widths)} entries for {len(sources)} layers (one per layer)")
        for layer, bits in enumerate(widths):
            field = f"settings.{name}[{layer}]"
            if layer in exact or sources[layer] is None:
                if bits is not None:
                    why = "kept exact" if layer in exact else "the chain start (it takes settings.layer0_bits)"
                    raise ValueError(f"{field} must be null: layer {layer} is {why}, got {bits!r}")
                continue
            if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or bits <= 0:
                raise ValueError(f"{field} must be a finite positive number of bits per value, got {bits!r}")
            try:
                HiggsQuantizer(bits=bits, dim=settings.grid_dim, group_size=settings.group_size, seed=settings.seed)
            except ValueError as e:
                raise ValueError(f"{field} {bits!r} bits: no shipped grid for it ({e})") from None


def parse_layer0_bits(layer0_bits: float | str | None) -> float | None:
    if layer0_bits is None or layer0_bits == "fp16":
        return None
    if isinstance(layer0_bits, str):
        raise ValueError(f"layer0_bits must be a number of bits or 'fp16', got {layer0_bits!r}")
    return layer0_bits
