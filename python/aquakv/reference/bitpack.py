"""Dense LSB-first bit packing (reference).

A row of `count` b-bit codes is one bitstream: code i fills bits [i*b, (i+1)*b) of the row, bit k of
the row is bit (k % 8) of byte k // 8, and the row takes ceil(count*b/8) bytes (unused bits zero).
"""
from __future__ import annotations

import numpy as np


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes: integer [..., count] (only the low `bits` bits kept) -> uint8 [..., ceil(count*bits/8)]."""
    codes = np.asarray(codes).astype(np.int64)
    count = codes.shape[-1]
    # Bit j of code i -> position i*bits + j of the row's bitstream.
    stream = (codes[..., None] >> np.arange(bits)) & 1
    stream = stream.reshape(*codes.shape[:-1], count * bits).astype(np.uint8)
    pad = -(count * bits) % 8
    stream = np.concatenate([stream, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """packed: uint8 [..., ceil(count*bits/8)] -> int32 [..., count]."""
    packed = np.asarray(packed, dtype=np.uint8)
    nbytes = (count * bits + 7) // 8
    if packed.shape[-1] != nbytes:
        raise ValueError(f"unpack_bits: packed last dim {packed.shape[-1]} != ceil({count} * {bits} / 8) = {nbytes}")
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    stream = stream.reshape(*packed.shape[:-1], count, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(axis=-1).astype(np.int32)
