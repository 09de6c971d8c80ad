"""How ChunkedKVCache (aquakv.kv.policy) serves a layer's quantized tokens to attention, as a mixin: their inputs
(the previous compressed layer's reconstruction, cos/sin), the buffer encoded as a new chunk, and the stored tokens
either decoded whole into what attention reads (materialize: composed, or one fused kernel per part) or deferred to
blockwise attention, block by block.
"""
from __future__ import annotations

import torch

from aquakv.kv import attention as attention_module
from aquakv.kv.codec import KV
from aquakv.kv.rope import rotate, unrotate


def _tokens(pair: KV | None, start: int, stop: int) -> KV | None:
    """Tokens [start, stop) of a pair of [B, H, T, D] tensors, as views."""
    return None if pair is None else (pair[0][:, :, start:stop], pair[1][:, :, start:stop])


def _on(pair: KV | None, device: torch.device) -> KV | None:
    """A pair of tensors on `device` (no copy when already there)."""
    return None if pair is None else (pair[0].to(device), pair[1].to(device))


class QuantizedServing:
    """The quantized-token half of ChunkedKVCache's update; it reads the cache's codec, sources, tracker, chain_dtype
    and per-forward state (_prev, _rope)."""

    def _cos_sin(self, positions: torch.Tensor, start: int, stop: int, layer_idx: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, stop - start, R] of cached tokens for layer `layer_idx`; every layer of a forward asks for the
        same range and layers of one kind (`RotaryTracker.kind`: one kind for most models, one per layer type for
        Gemma 3) share cos/sin, so the first answer per kind is kept until the end of the forward (transient, like
        the previous layer's reconstruction)."""
        if self._rope is None or self._rope[0] != (start, stop):
            self._rope = ((start, stop), {})
        kind, per_kind = self.tracker.kind(layer_idx), self._rope[1]
        if kind not in per_kind:
            per_kind[kind] = self.tracker.cos_sin(positions[:, start:stop], layer_idx)
        return per_kind[kind]

    def _previous(self, layer_idx: int, num_tokens: int) -> KV | None:
        source = self.sources[layer_idx]
        if not self.codec.needs_previous_layer or source is None:
            return None
        if self._prev is None or self._prev[0] != source or self._prev[1][0].shape[2] != num_tokens:
            got = "nothing" if self._prev is None else f"layer {self._prev[0]} with {self._prev[1][0].shape[2]} tokens"
            raise RuntimeError(f"{type(self).__name__}: layer {layer_idx} needs layer {source}'s reconstruction "
                               f"of {num_tokens} tokens from this forward, found {got}")
        return self._prev[1]

    def _inputs(self, layer_idx: int, positions: torch.Tensor | None, start: int, n_tokens: int,
                device: torch.device) -> tuple[KV | None, torch.Tensor | None, torch.Tensor | None]:
        """What decoding and encoding the layer's n_tokens quantized tokens need: the previous layer's reconstruction
        (or None) and, for a pre-RoPE codec, their cos/sin; on the layer's device (layers may sit on several GPUs)."""
        prev = _on(self._previous(layer_idx, n_tokens), device)
        cos = sin = None
        if self.codec.pre_rope:
            cos, sin = _on(self._cos_sin(positions, start, start + n_tokens, layer_idx), device)
        return prev, cos, sin

    def _encode(self, layer_idx: int, store, prev: KV | None, cos, sin, n_old: int, buf_k: torch.Tensor,
                buf_v: torch.Tensor) -> tuple[object, torch.Tensor, torch.Tensor]:
        """The buffer encoded as the chunk after the n_old stored tokens -> (new store, keys_hat, values_hat)."""
        pk = None if prev is None else (prev[0][:, :, n_old:], prev[1][:, :, n_old:])
        k_in = buf_k.float()
        if self.codec.pre_rope:
            k_in = unrotate(k_in, cos[:, n_old:], sin[:, n_old:])
        chunk, k_hat, v_hat = self.codec.encode(layer_idx, k_in, buf_v.float(), pk)
        return self.codec.append(store, chunk), k_hat, v_hat

    def _update_quantized(self, layer_idx: int, store, positions: torch.Tensor | None, start: int, n_old: int,
                          n_new: int, buf_k: torch.Tensor | None, buf_v: torch.Tensor | None, out_k: torch.Tensor,
                          out_v: torch.Tensor) -> tuple[object, KV | None]:
        """Decode the layer's store into out_k / out_v ([B, H, n_old, D] views of what attention reads; keys
        re-rotated) and, if n_new, encode the buffer as a new chunk. Changes nothing of the layer.

        Returns (the store with the new chunk, this layer's reconstruction of all its quantized tokens for the next
        layer or None when the codec does not need it).
        """
        codec = self.codec
        prev, cos, sin = self._inputs(layer_idx, positions, start, n_old + n_new, out_k.device)
        if codec.fused_decode_block:
            return self._update_quantized_fused(layer_idx, store, prev, cos, sin, n_old, n_new, buf_k, buf_v,
                                                out_k, out_v)
        hat_k, hat_v = [], []
        if n_old:
            pk = None if prev is None else (prev[0][:, :, :n_old], prev[1][:, :, :n_old])
            k_hat, v_hat = codec.decode(layer_idx, store, pk)
            if codec.pre_rope:
                rotate(k_hat, cos[:, :n_old], sin[:, :n_old], out=out_k)
            else:
                out_k.copy_(k_hat)
            out_v.copy_(v_hat)
            hat_k.append(k_hat)
            hat_v.append(v_hat)
        if n_new:
            store, k_hat_new, v_hat_new = self._encode(layer_idx, store, prev, cos, sin, n_old, buf_k, buf_v)
            hat_k.append(k_hat_new)
            hat_v.append(v_hat_new)
        if not codec.needs_previous_layer:
            return store, None
        if len(hat_k) == 1:
            return store, (hat_k[0].to(self.chain_dtype), hat_v[0].to(self.chain_dtype))
        return store, (torch.cat(hat_k, dim=2).to(self.chain_dtype), torch.cat(hat_v, dim=2).to(self.chain_dtype))

    def _update_quantized_fused(self, layer_idx: int, store, prev: KV | None, cos, sin, n_old: int, n_new: int,
                                buf_k: torch.Tensor | None, buf_v: torch.Tensor | None, out_k: torch.Tensor,
                                out_v: torch.Tensor) -> tuple[object, KV | None]:
        """`_update_quantized` through the codec's fused decode_block: one kernel per part writes the re-rotated keys
        and the values into out_k / out_v, and the chain straight into the buffer the next layer reads."""
        codec = self.codec
        chain = None
        if codec.needs_previous_layer:
            b, h, _, d = out_k.shape
            rows = torch.empty((2, b, n_old + n_new, h * d), dtype=self.chain_dtype, device=out_k.device)
            chain = tuple(r.view(b, n_old + n_new, h, d).transpose(1, 2) for r in rows)  # [B, H, T, D] views of rows
        if n_old:
            c, s = (None, None) if cos is None else (cos[:, :n_old], sin[:, :n_old])
            codec.decode_block(layer_idx, store, 0, n_old, _tokens(prev, 0, n_old), c, s, out_k.dtype,
                               _tokens(chain, 0, n_old), out=(out_k, out_v))
        if n_new:
            store, k_hat_new, v_hat_new = self._encode(layer_idx, store, prev, cos, sin, n_old, buf_k, buf_v)
            if chain is not None:
                chain[0][:, :, n_old:].copy_(k_hat_new)
                chain[1][:, :, n_old:].copy_(v_hat_new)
        return store, chain

    def _defer_quantized(self, layer_idx: int, store, positions: torch.Tensor | None, start: int, n_old: int,
                         n_new: int, buf_k: torch.Tensor | None, buf_v: torch.Tensor | None, keys: torch.Tensor,
                         values: torch.Tensor, q_len: int) -> tuple[object, KV | None, attention_module.DeferredLayer]:
        """`_update_quantized` for attention="blockwise": the new chunk (if n_new) is encoded now; the n_old stored
        tokens are decoded later, block by block, by the attention that consumes the returned DeferredLayer.

        Returns (the store with the new chunk, this layer's reconstruction of all its quantized tokens for the next
        layer ([B, H, n_old + n_new, D] in the storage dtype, filled as attention reads the blocks) or None, the
        DeferredLayer). keys / values: the exact tokens returned to attention (sinks | buffer); q_len: the queries.

        That reconstruction (in chain_dtype) is the one part of a blockwise forward that grows with the context.
        """
        codec, device = self.codec, keys.device
        prev, cos, sin = self._inputs(layer_idx, positions, start, n_old + n_new, device)
        hat = None
        if codec.needs_previous_layer and layer_idx in self.sources:  # a later layer is predicted from this one
            b, h, _, d = keys.shape
            rows = torch.empty((2, b, n_old + n_new, h * d), dtype=self.chain_dtype, device=device)
            hat = tuple(r.view(b, n_old + n_new, h, d).transpose(1, 2) for r in rows)  # [B, H, T, D] views of rows
        new_store = store
        if n_new:
            new_store, k_hat_new, v_hat_new = self._encode(layer_idx, store, prev, cos, sin, n_old, buf_k, buf_v)
            if hat is not None:
                hat[0][:, :, n_old:].copy_(k_hat_new)
                hat[1][:, :, n_old:].copy_(v_hat_new)
        dtype, step = keys.dtype, self._block_tokens(q_len, keys.shape[1] * keys.shape[3])

        def blocks():
            for t0 in range(0, n_old, step):
                t1 = min(n_old, t0 + step)
                c, s = (None, None) if cos is None else (cos[:, t0:t1], sin[:, t0:t1])
                keys_b, values_b = codec.decode_block(layer_idx, store, t0, t1, _tokens(prev, t0, t1), c, s, dtype,
                                                      _tokens(hat, t0, t1))
                yield t0, t1, keys_b, values_b

        deferred = attention_module.DeferredLayer(layer_idx, keys, values, start, n_old, blocks)
        return new_store, hat, deferred
