"""The quantizer settings AQUA-KV predictors are calibrated with and the cache quantizes with (plain data: the
predictors and their file both read them, neither through the other)."""
from __future__ import annotations

from dataclasses import dataclass

from aquakv.quantizer import HiggsQuantizer


@dataclass(frozen=True)
class AquaKVSettings:
    """Quantizer settings shared by calibration and the cache.

    bits: bits per value (log2(n) / grid_dim) for layers >= 1 (HIGGS grid (grid_dim, n = 2**(bits*grid_dim))).
    layer0_bits: bits per value for layer 0 (the first compressed layer: it has nothing to be predicted from), or
      None to keep it in fp16 (no quantization).
    group_size: HIGGS group (values sharing a scale and a Hadamard rotation); defaults to head_dim.
    """

    bits: float
    grid_dim: int
    group_size: int
    seed: int
    layer0_bits: float | None

    def quantizer_for(self, chain_start: bool) -> HiggsQuantizer | None:
        """The residual quantizer of the first compressed layer (chain_start) or of any later one; None means the
        layer is stored in fp16."""
        bits = self.layer0_bits if chain_start else self.bits
        if bits is None:
            return None
        return HiggsQuantizer(bits=bits, dim=self.grid_dim, group_size=self.group_size, seed=self.seed)


def parse_layer0_bits(layer0_bits: float | str | None) -> float | None:
    if layer0_bits is None or layer0_bits == "fp16":
        return None
    if isinstance(layer0_bits, str):
        raise ValueError(f"layer0_bits must be a number of bits or 'fp16', got {layer0_bits!r}")
    return layer0_bits
