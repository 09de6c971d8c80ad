"""KIVI-style uniform KV-cache quantization: the tuning-free baseline AQUA-KV is measured against.

KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):
- keys are quantized per channel: each channel gets its own min/max over a group of `group_size`
  consecutive tokens (key outliers live in fixed channels, so per-channel ranges stay tight);
- values are quantized per token, in groups of `group_size` channels;
- quantization is asymmetric uniform: code = round((x - min) / scale), scale = (max - min) / (2^b - 1),
  with the scale and the minimum (zero point) stored in fp16;
- the newest tokens stay in an fp16 residual window of up to R = 128 tokens.

Here the numbers live in `KiviCodec` and the residual window is the fp16 buffer of the package's chunking
cache (`aquakv.kv.cache.ChunkedKVCache`): once the buffer holds >= `buffer` tokens they are quantized as one
chunk, keys in groups of `group_size` tokens per channel, values per token. (KIVI proper releases values
from the window one token at a time; flushing whole chunks keeps between 0 and R values in fp16 instead of
exactly R, and lets every codec of the package share one policy.) Nothing here needs calibration. The min/max
quantizer is the package's one (`aquakv.uniform`, shared with RTN weights); codes are bit-packed by
`torch.ops.aquakv.pack_bits` (4 codes per byte at 2 bits, 2 at 4 bits) and `nbytes` counts every stored byte:
packed codes, fp16 scales and zero points, fp16 sinks and buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aquakv.kv.codec import KVCodec, deliver
from aquakv.uniform import UniformQuantized, dequantize_uniform, quantize_uniform

_SUPPORTED_BITS = (1, 2, 4, 8)


@dataclass
class KiviChunk:
    """One quantized chunk of T tokens of one layer.

    keys:   per channel over groups of `group_size` tokens: logical [B, H, ceil(T / G), D, G] (the last group is
            padded by repeating the chunk's last token, which leaves its min/max unchanged);
    values: per token over groups of g channels: logical [B, H, T, D / g, g].
    """

    keys: UniformQuantized
    values: UniformQuantized
    num_tokens: int

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class KiviCodec(KVCodec):
    """KIVI's numbers as a `KVCodec` (the cache, `aquakv.kv.cache.ChunkedKVCache`, owns the fp16 sinks and buffer).

    bits: 1, 2, 4 or 8. group_size: tokens per key group and channels per value group (capped at head_dim).
    pre_rope: quantize keys before RoPE (KIVI quantizes the post-RoPE keys the model hands the cache: False).
    """

    needs_previous_layer = False

    def __init__(self, bits: int = 2, group_size: int = 32, pre_rope: bool = False):
        if bits not in _SUPPORTED_BITS:
            raise ValueError(f"KiviCodec: bits must be one of {_SUPPORTED_BITS}, got {bits}")
        if group_size < 1:
            raise ValueError(f"KiviCodec: group_size must be >= 1, got {group_size}")
        self.bits = bits
        self.group_size = group_size
        self.pre_rope = pre_rope

    def _value_group(self, head_dim: int) -> int:
        g = min(self.group_size, head_dim)
        if head_dim % g:
            raise ValueError(f"KiviCodec: head_dim {head_dim} is not a multiple of group_size {self.group_size}")
        return g

    def _encode_chunk(self, keys: torch.Tensor, values: torch.Tensor) -> KiviChunk:
        b, h, t, d = keys.shape
        g = self.group_size
        pad = -t % g
        if pad:
            keys = torch.cat([keys, keys[:, :, -1:].expand(b, h, pad, d)], dim=2)
        qk = quantize_uniform(keys.reshape(b, h, (t + pad) // g, g, d).transpose(-1, -2), self.bits)
        gv = self._value_group(d)
        qv = quantize_uniform(values.reshape(b, h, t, d // gv, gv), self.bits)
        return KiviChunk(qk, qv, t)

    @staticmethod
    def _decode_chunk(chunk: KiviChunk) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n, d, g = chunk.keys.shape
        keys = dequantize_uniform(chunk.keys, torch.float32).transpose(-1, -2).reshape(b, h, n * g, d)
        values = dequantize_uniform(chunk.values, torch.float32).flatten(-2)
        return keys[:, :, : chunk.num_tokens], values

    def encode(self, layer_idx, keys, values, prev):
        chunk = self._encode_chunk(keys, values)
        k_hat, v_hat = self._decode_chunk(chunk)
        return [chunk], k_hat, v_hat

    def decode(self, layer_idx, store, chain, *, start=0, stop=None, cos=None, sin=None, dtype=torch.float32,
               chain_out=None, out=None):
        """`KVCodec.decode`: the chunks that overlap [start, stop) are decoded (a chunk is the unit of KIVI's key
        groups) and cut to those tokens; keys re-rotated when cos/sin are given (pre_rope)."""
        stop = self.num_tokens(store) if stop is None else stop
        keys, values, seen = [], [], 0
        for c in store:
            lo, hi = max(start - seen, 0), min(stop - seen, c.num_tokens)
            if lo < hi:
                k, v = self._decode_chunk(c)
                keys.append(k[:, :, lo:hi])
                values.append(v[:, :, lo:hi])
            seen += c.num_tokens
            if seen >= stop:
                break
        if len(keys) == 1:
            k_hat, v_hat = keys[0], values[0]
        else:
            k_hat, v_hat = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        return deliver(k_hat, v_hat, cos=cos, sin=sin, dtype=dtype, chain_out=chain_out, out=out)

    def append(self, store, new):
        return list(new) if store is None else store + list(new)

    def select_batch(self, store, index):
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index.to(t.device))
        return [KiviChunk(c.keys.map(pick), c.values.map(pick), c.num_tokens) for c in store]

    def truncate(self, store, n_tokens):
        """Keep the first n_tokens: whole chunks as they are; a chunk cut in the middle is re-encoded from its
        reconstruction (once more lossy, like any re-quantization; crops are rare: assisted decoding)."""
        kept, seen = [], 0
        for c in store:
            if seen + c.num_tokens <= n_tokens:
                kept.append(c)
                seen += c.num_tokens
                continue
            if n_tokens > seen:
                k, v = self._decode_chunk(c)
                kept.append(self._encode_chunk(k[:, :, : n_tokens - seen], v[:, :, : n_tokens - seen]))
            break
        return kept

    def num_tokens(self, store):
        return sum(c.num_tokens for c in store)

    def nbytes(self, store):
        return sum(c.nbytes for c in store)

    def __repr__(self) -> str:
        return f"KiviCodec(bits={self.bits}, group_size={self.group_size}, pre_rope={self.pre_rope})"
