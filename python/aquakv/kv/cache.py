"""`ChunkedKVCache`: the transformers 5.x `Cache` over any `aquakv.kv.codec.KVCodec`, the one adapter between the
codecs and transformers. AquaKVCache, HiggsCache and KiviCache (`aquakv.kv.cache_presets`) are it with a codec.

Per layer it keeps (`aquakv.kv.cache_state.ChunkedLayer`)
  sinks:  the first `sinks` tokens, post-RoPE, in the storage dtype (never quantized: attention sinks);
  store:  the codec's store of every quantized token (chunks appended in order, never re-quantized);
  buffer: the newest tokens, post-RoPE, in the storage dtype, until it holds >= `buffer` tokens; then it is
          encoded once as a chunk. The forward that flushes still attends to the exact states; the quantized
          ones are used from the next forward on.
Every compressed layer holds the same token layout, so a layer's chunk can be predicted from the chain (the previous
compressed layer's reconstruction of the same tokens), which `ForwardState` keeps from that layer's update to the
next (dropped after the last layer). A hybrid model's local layers stay exact rolling windows (`LocalLayer`).
An update completes or leaves its layer as it was; a forward that fails half-way leaves a cache that refuses every
call until `reset()`. More in docs/kv_cache.md.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from aquakv.kv import attention
from aquakv.kv.cache_state import (ChunkedLayer, ForwardState, LocalLayer, append_tokens, checked_batch_index,
                                    materialize_layers, on_device, serve_layer)
from aquakv.kv.codec import KV, KVCodec, compact
from aquakv.kv.local_layers import chain_sources, exact_local_layers
from aquakv.kv.rope import RotaryTracker
from aquakv.kv.support import check_supported

ATTENTION_MODES = ("materialize", "blockwise")
# What one block of blockwise attention may hold when block_tokens is None: its float32 scores for every query, its
# rebuilt keys and values and their float32 reconstructions. 4 MiB: at 8k tokens a few percent of fp16's cache.
BLOCK_BYTES = 4 << 20
MIN_BLOCK_TOKENS = 64  # below this, a block's Python-level merge costs more than its arithmetic


class ChunkedKVCache(Cache):
    """A transformers Cache that keeps attention sinks and a recent buffer exact and compresses everything else
    chunk by chunk with `codec` (see the module docstring and docs/kv_cache.md).

    model: the model served (its rotary module is hooked when codec.pre_rope). sinks: first tokens kept exact;
    buffer: flush threshold of the exact recent buffer (tokens). storage_dtype: of sinks and buffer; default fp16
    (bf16 for bf16 models). attention: "materialize" hands attention every layer's whole reconstruction (any
    attention implementation); "blockwise" switches the model to `aquakv.kv.attention`, which rebuilds the quantized
    tokens a block at a time inside attention (docs/long_context.md). block_tokens: tokens per block; None sizes them
    so that one block's scores and rebuilt keys and values take about BLOCK_BYTES. chain_dtype: dtype of the chain
    a forward keeps between layers (AQUA-KV); default float32 when materialized, storage_dtype when blockwise, where
    it is the one transient that grows with the context. Remove the rotary hook with `close()` or `with cache:`; it
    also goes when the cache is garbage-collected. A pickled cache comes back detached: `attach(model)` to update it.
    """

    def __init__(self, model, codec: KVCodec, *, sinks: int = 4, buffer: int = 128,
                 storage_dtype: torch.dtype | None = None, rotary: torch.nn.Module | None = None,
                 attention: str = "materialize", block_tokens: int | None = None,
                 chain_dtype: torch.dtype | None = None):
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if block_tokens is not None and (isinstance(block_tokens, bool) or not isinstance(block_tokens, int)
                                         or block_tokens < 1):
            raise ValueError(f"block_tokens must be a positive integer or None, got {block_tokens!r}")
        if chain_dtype is not None and not (isinstance(chain_dtype, torch.dtype) and chain_dtype.is_floating_point):
            raise ValueError(f"chain_dtype must be a floating-point torch.dtype, got {chain_dtype!r}")
        check_supported(model, who=type(self).__name__, pre_rope=codec.pre_rope)
        cfg = model.config.get_text_config(decoder=True)
        model_dtype = next(model.parameters()).dtype
        self.storage_dtype = storage_dtype or (torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16)
        self.chain_dtype = chain_dtype or (self.storage_dtype if attention == "blockwise" else torch.float32)
        local = exact_local_layers(cfg)
        super().__init__(layers=[LocalLayer(local[i], self.storage_dtype) if i in local else ChunkedLayer()
                                 for i in range(cfg.num_hidden_layers)])
        self.sources = chain_sources(cfg.num_hidden_layers, local)  # the layer each compressed layer is predicted from
        self.codec, self.sinks, self.buffer = codec, sinks, buffer
        self.attention, self.block_tokens = attention, block_tokens
        self._query_heads = cfg.num_attention_heads
        self.positions: torch.Tensor | None = None  # [B, T] int32, every cached token's rotary position
        self.forward = ForwardState()  # transient: lives within one forward
        self._broken: str | None = None  # why the layers disagree after a failure; reset() clears it
        self.tracker: RotaryTracker | None = None
        self.attach(model, rotary)

    # ---- lifetime ------------------------------------------------------------------------------------
    def attach(self, model, rotary: torch.nn.Module | None = None) -> None:
        """Serve `model`: hook its rotary module (pre-RoPE codecs) and, for attention="blockwise", switch it to the
        blockwise attention. Done by the constructor; call it again on a cache restored from a pickle."""
        if self.attention == "blockwise":
            attention.install(model)
        if self.codec.pre_rope:
            self.close()
            self.tracker = RotaryTracker(model, rotary)
        self._model_config = model.config  # its attention implementation is checked at every update
        self._attached = True

    def close(self) -> None:
        """Remove the rotary hook; the cache can no longer be updated (it may still be read for lengths)."""
        if self.tracker is not None:
            self.tracker.close()

    def __enter__(self) -> "ChunkedKVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickled (and deep-copied) without the forward in progress; a pre-RoPE or blockwise cache comes back
        detached (the rotary hook and the model's attention are the model's): `attach(model)` before updating it."""
        return dict(self.__dict__, forward=ForwardState(),
                    _attached=self.tracker is None and self.attention == "materialize")

    # ---- the update ----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> KV:
        """key_states (post-RoPE), value_states: [B, H, T, D] -> all keys and values [B, H, T_total, D].

        Everything that can fail runs before the layer changes, so a failing update leaves its layer as it was; if an
        earlier layer of the same forward already took the new tokens, the cache is marked unusable.
        """
        who = f"{type(self).__name__}.update(layer {layer_idx})"
        if not self._attached:
            raise RuntimeError(f"{who}: this cache was restored from a pickle; call cache.attach(model) first")
        self._check_usable(who)
        deferred, self.forward.deferred = self.forward.deferred, None
        if deferred is not None and not deferred.consumed:  # the next layer's predictor needs what it decodes
            self._broken = (f"layer {deferred.layer_idx}'s attention did not read its {deferred.num_quantized} "
                            f"compressed tokens (the model's attention implementation must stay "
                            f"{attention.NAME!r} while a cache with attention='blockwise' serves it)")
            self._check_usable(who)
        if layer_idx == 0:
            self.forward.changed = False
        try:
            return self._update(key_states, value_states, layer_idx, who)
        except BaseException as error:
            if self.forward.changed:
                self._broken = (f"{who} failed after this forward had already changed earlier layers "
                                f"({type(error).__name__}: {error})")
            raise

    def _check_usable(self, who: str) -> None:
        if self._broken is not None:
            raise RuntimeError(f"{who}: this cache is unusable: {self._broken}. Call reset() to use it again")

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, who: str) -> KV:
        layer, fwd = self.layers[layer_idx], self.forward
        batch, heads, length, head_dim = key_states.shape
        if layer.is_initialized and batch != layer.batch:
            raise ValueError(f"{who}: batch size {batch} but the cache holds batch {layer.batch}; reset() it first")
        positions = self.positions
        if layer_idx == 0:
            lengths = [lay.get_seq_length() for lay in self.layers]
            if len(set(lengths)) > 1:
                self._broken = f"an earlier forward did not update every layer (layer lengths {lengths})"
                self._check_usable(who)
            positions = fwd.begin(self.tracker, positions, batch, length, who)
        elif layer.get_seq_length() + length != self.layers[0].get_seq_length():
            raise RuntimeError(f"{who}: {layer.get_seq_length()} cached + {length} new tokens but layer 0 holds "
                               f"{self.layers[0].get_seq_length()}: layers must be updated in order 0..L-1 in every "
                               f"forward")
        if isinstance(layer, LocalLayer):  # an exact local layer: nothing to compress, nothing to predict
            keys, values = layer.update(key_states, value_states)
            fwd.changed = True
            self.positions = positions
            self._end_of_layer(layer_idx)
            return keys, values

        # The layer's next state, built aside: nothing below changes the layer until every step has succeeded.
        k_new, v_new = key_states.to(self.storage_dtype), value_states.to(self.storage_dtype)
        take = max(min(self.sinks - layer.num_sinks, length), 0)
        sink_k, sink_v, buf_k, buf_v = layer.sink_k, layer.sink_v, layer.buf_k, layer.buf_v
        if take:
            sink_k, sink_v = append_tokens(sink_k, k_new[:, :, :take]), append_tokens(sink_v, v_new[:, :, :take])
        if length > take:
            buf_k, buf_v = append_tokens(buf_k, k_new[:, :, take:]), append_tokens(buf_v, v_new[:, :, take:])
        sinks, old, buffered = layer.num_sinks + take, layer.num_quantized, layer.num_buffered + length - take

        # What attention reads: sinks | quantized tokens as decoded before this call's flush | the buffer (the
        # tokens this call flushes are returned exact). Blockwise, the quantized tokens are left out of the returned
        # tensors and rebuilt inside attention from the DeferredLayer the keys carry.
        defer = old > 0 and self.attention == "blockwise" and attention.is_installed(self._model_config)
        middle = 0 if defer else old
        keys = key_states.new_empty((batch, heads, sinks + middle + buffered, head_dim))
        values = value_states.new_empty(keys.shape)
        if sinks:
            keys[:, :, :sinks], values[:, :, :sinks] = sink_k, sink_v
        if buffered:
            keys[:, :, sinks + middle:], values[:, :, sinks + middle:] = buf_k, buf_v
        flush = buffered >= self.buffer
        n_new = buffered if flush else 0
        store, chain, deferred = layer.store, None, None
        if old or flush:
            n = old + n_new
            prev = cos = sin = None
            if self.codec.needs_previous_layer:
                prev = on_device(fwd.chain_for(layer_idx, self.sources[layer_idx], n, type(self).__name__),
                                 keys.device)
            if self.codec.pre_rope:
                cos, sin = on_device(fwd.cos_sin(self.tracker, positions, sinks, sinks + n, layer_idx), keys.device)
            keep_chain = self.codec.needs_previous_layer and layer_idx in self.sources
            step = self._block_tokens(length, heads * head_dim) if defer else None
            store, chain, deferred = serve_layer(self.codec, layer_idx, layer.store, chain=prev, cos=cos, sin=sin,
                                                 n_old=old, n_new=n_new, buf_k=buf_k, buf_v=buf_v,
                                                 keep_chain=keep_chain, chain_dtype=self.chain_dtype, keys=keys,
                                                 values=values, start=sinks, step=step)

        # Commit.
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        fwd.changed = True
        layer.sink_k, layer.sink_v, layer.num_sinks = sink_k, sink_v, sinks
        if flush:
            layer.store, layer.num_quantized, buf_k, buf_v, buffered = store, old + buffered, None, None, 0
        layer.buf_k, layer.buf_v, layer.num_buffered = buf_k, buf_v, buffered
        self.positions = positions
        if chain is not None:
            fwd.chain = (layer_idx, chain)
        self._end_of_layer(layer_idx)
        if deferred is not None:
            fwd.deferred = attention.defer(keys, deferred)
        return keys, values

    def _end_of_layer(self, layer_idx: int) -> None:
        """The chain and the cos/sin serve only the forward in progress: dropped after the last layer."""
        if layer_idx == len(self.layers) - 1:
            self.forward.chain = self.forward.rope = None
            self.forward.changed = False

    def _block_tokens(self, q_len: int, channels: int) -> int:
        """Tokens per block of blockwise attention for q_len queries over `channels` = H * D."""
        if self.block_tokens is not None:
            return self.block_tokens
        per_token = 4 * self._query_heads * q_len + 16 * channels  # scores; keys, values and their float32 hats
        return max(MIN_BLOCK_TOKENS, BLOCK_BYTES // per_token)

    def materialize(self, dtype: torch.dtype = torch.float32) -> list[KV]:
        """Every layer's keys (post-RoPE) and values [B, H, T, D] as the next forward would read them, decoded by
        the route attention uses. For inspection and error measurements: it holds all layers at once, which the
        cache itself never does."""
        self._check_usable(f"{type(self).__name__}.materialize")
        return materialize_layers(self.layers, self.codec, self.sources, self.tracker, self.positions,
                                  self.chain_dtype, dtype)

    # ---- batch and length edits (beam search, assisted decoding, reuse) ---------------------------------
    def _edit(self, who: str, edit) -> None:
        """Run `edit` (arguments already checked); a failure half-way leaves layers that disagree: mark it."""
        self._check_usable(who)
        self.forward.clear()
        try:
            edit()
        except BaseException as error:
            self._broken = f"{who} failed half-way ({type(error).__name__}: {error})"
            raise

    def _batch(self) -> int | None:
        if self.layers[0].is_initialized:
            return self.layers[0].batch
        return None if self.positions is None else self.positions.shape[0]

    def _select_batch(self, index, who: str) -> None:
        self._check_usable(who)
        index = checked_batch_index(index, self._batch(), who)

        def select() -> None:
            for layer in self.layers:
                if layer.is_initialized:
                    layer.select_rows(index.to(layer.device), self.codec)
            if self.positions is not None:
                self.positions = self.positions.index_select(0, index.to(self.positions.device))
        self._edit(who, select)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row i becomes old row beam_idx[i] (codes are reordered, never re-quantized).
        A bad index (not 1-D integers within the batch) raises before anything changes."""
        self._select_batch(beam_idx, f"{type(self).__name__}.reorder_cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices, f"{type(self).__name__}.batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        who = f"{type(self).__name__}.batch_repeat_interleave"
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"{who}: repeats must be a positive integer, got {repeats!r}")
        batch = self._batch()
        if batch:
            self._select_batch(torch.arange(batch).repeat_interleave(repeats), who)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove tokens (a negative count, like DynamicCache); exact for every part.
        What is kept is copied, so the cropped tokens' bytes are freed."""
        who = f"{type(self).__name__}.crop"
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(f"{who}: pass a negative number of tokens to remove, got {tokens_to_remove!r}")
        self._check_usable(who)
        total = self.get_seq_length()
        if tokens_to_remove == 0 or total == 0:
            return
        keep = max(total + tokens_to_remove, 0)
        for layer in self.layers:
            if isinstance(layer, LocalLayer) and layer.is_initialized:
                layer.check_keep_first(keep, who)

        def cut() -> None:
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keep_first(keep, self.codec)
            if self.positions is not None:
                self.positions = compact(self.positions[:, :keep]) if keep else None
        self._edit(who, cut)

    def reset(self) -> None:
        """Drop every cached token (the hook stays: the cache can be reused); also makes an unusable cache usable."""
        self.forward.clear()
        self._broken = None
        self.positions = None
        for layer in self.layers:
            layer.reset()

    # ---- accounting ------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Every byte held: codec stores (codes, scales, ...), exact sinks and buffers, positions."""
        total = 0 if self.positions is None else self.positions.numel() * self.positions.element_size()
        for layer in self.layers:
            total += sum(t.numel() * t.element_size() for t in layer.tensors())
            if layer.store is not None:
                total += self.codec.nbytes(layer.store)
        return total

    def compressed_values(self) -> int:
        """Number of key and value entries held by codec stores (B * T_quantized * C * 2, summed over layers)."""
        return sum(2 * layer.batch * layer.num_heads * layer.head_dim * layer.num_quantized
                   for layer in self.layers if layer.store is not None)

    def bits_per_value(self) -> float | None:
        """Bits per key/value entry of the compressed part (all codec stores). None while nothing is compressed (an
        empty cache, or one holding fewer tokens than sinks + buffer: every token still exact), so that no number
        stands for a part that does not exist; `nbytes()` then counts the exact tokens."""
        values = self.compressed_values()
        if not values:
            return None
        return 8.0 * sum(self.codec.nbytes(layer.store) for layer in self.layers if layer.store is not None) / values

    def __repr__(self) -> str:
        n = self.get_seq_length()
        return (f"{type(self).__name__}({len(self.layers)} layers, {n} tokens, codec={type(self.codec).__name__}, "
                f"sinks={self.sinks}, buffer={self.buffer}, {self.nbytes()} bytes)")
