"""The chunking policy shared by every compressed KV cache of the package, as a transformers 5.x `Cache`; codecs
(`aquakv.kv.codec.KVCodec`) compress the chunks it hands them.

Per layer the policy keeps
  sinks:  the first `sinks` tokens, post-RoPE, in the storage dtype (never quantized: attention sinks);
  store:  a codec object holding every quantized token (chunks appended in order, never re-quantized);
  buffer: the newest tokens, post-RoPE, in the storage dtype, until it holds >= `buffer` tokens; then it is
          encoded once as a chunk. The forward that flushes still attends to the exact states; the quantized
          ones are used from the next forward on.
Every compressed layer holds the same token layout, so layer l's chunk can be predicted from the previous compressed
layer's reconstruction of the same tokens, which the cache keeps transiently from that layer's `update` call in the
same forward (dropped after the last layer). The local layers of a hybrid model (Gemma 3) are not compressed: they
are exact rolling windows (`aquakv.kv.window.WindowLayer`), as in transformers' DynamicCache. An update completes
or leaves its layer as it was; a forward that fails half-way leaves a cache that refuses every call until
`reset()`. More in docs/kv_cache.md (in this repository).
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from aquakv.kv import attention as attention_module
from aquakv.kv.codec import KV, ChunkedLayer, KVCodec, _cat
from aquakv.kv.edits import CacheEdits
from aquakv.kv.serving import QuantizedServing, _on
from aquakv.kv.rope import RotaryTracker, rotate
from aquakv.kv.support import check_supported
from aquakv.kv.window import WindowLayer, chain_sources, window_layers

ATTENTION_MODES = ("materialize", "blockwise")
# What one block of blockwise attention may hold when block_tokens is None: its float32 scores for every query, its
# rebuilt keys and values and their float32 reconstructions. 4 MiB: at 8k tokens a few percent of fp16's cache.
BLOCK_BYTES = 4 << 20
MIN_BLOCK_TOKENS = 64  # below this, a block's Python-level merge costs more than its arithmetic


class ChunkedKVCache(CacheEdits, QuantizedServing, Cache):
    """A transformers Cache that keeps attention sinks and a recent buffer exact and compresses everything else
    chunk by chunk with `codec` (see the module docstring and docs/kv_cache.md).

    model: the transformers model this cache serves (its rotary module is hooked when codec.pre_rope).
    sinks: first tokens kept exact; buffer: flush threshold of the exact recent buffer (tokens).
    storage_dtype: dtype of sinks and buffer; default fp16 (bf16 for bf16 models, whose states may exceed fp16).
    attention: "materialize" hands attention every layer's whole reconstruction (any attention implementation);
    "blockwise" switches the model to `aquakv.kv.attention` (from SDPA or eager), which rebuilds the quantized
    tokens a block at a time inside attention, so a forward's transient memory does not grow with a whole layer's
    reconstruction in the model's dtype (docs/long_context.md). block_tokens: tokens per block; None sizes each
    forward's blocks so that one block's scores and rebuilt keys and values take about BLOCK_BYTES (long prefill
    pieces get short blocks, a decode step long ones).
    chain_dtype: dtype of the reconstruction a layer keeps, during a forward, for the next layer's predictor (AQUA-KV);
    default float32 when materialized, storage_dtype when blockwise, where it is the one transient that grows with
    the context. Encoding and decoding read the same rounded values.
    Remove the rotary hook with `close()` or `with cache: ...`; it also goes when the cache is garbage-collected.
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
        if attention == "blockwise":
            if not codec.decodes_ranges:
                raise ValueError(f"attention='blockwise' needs a codec that decodes token ranges; "
                                 f"{type(codec).__name__} does not")
            attention_module.install(model)
        check_supported(model, who=type(self).__name__, pre_rope=codec.pre_rope)
        cfg = model.config.get_text_config(decoder=True)
        model_dtype = next(model.parameters()).dtype
        self.storage_dtype = storage_dtype or (torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16)
        if chain_dtype is not None and not (isinstance(chain_dtype, torch.dtype) and chain_dtype.is_floating_point):
            raise ValueError(f"chain_dtype must be a floating-point torch.dtype, got {chain_dtype!r}")
        self.chain_dtype = chain_dtype or (self.storage_dtype if attention == "blockwise" else torch.float32)
        windows = window_layers(cfg)
        super().__init__(layers=[WindowLayer(windows[i], self.storage_dtype) if i in windows else ChunkedLayer()
                                 for i in range(cfg.num_hidden_layers)])
        self.sources = chain_sources(cfg.num_hidden_layers, windows)  # the layer each compressed layer is predicted from
        self.codec = codec
        self.sinks = sinks
        self.buffer = buffer
        self.tracker = RotaryTracker(model, rotary) if codec.pre_rope else None
        self.positions: torch.Tensor | None = None  # [B, T] int32, every cached token's rotary position
        self._prev: tuple[int, KV] | None = None  # (last compressed layer, its quantized tokens' reconstruction)
        self._rope: tuple[tuple[int, int], dict] | None = None  # per layer kind, cos/sin of the quantized tokens
        self._forward_changed = False  # some layer took the tokens of the forward in progress
        self.attention, self.block_tokens = attention, block_tokens
        self._model_config = model.config  # its attention implementation is checked at every update
        self._query_heads = cfg.num_attention_heads
        self._deferred: attention_module.DeferredLayer | None = None  # left by the last update for attention
        self._broken: str | None = None  # why the layers disagree after a failure; reset() clears it

    # ---- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the rotary hook; the cache can no longer be updated (it may still be read for lengths)."""
        if self.tracker is not None:
            self.tracker.close()

    def __enter__(self) -> "ChunkedKVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the update ----------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> KV:
        """key_states (post-RoPE), value_states: [B, H, T, D] -> all keys and values [B, H, T_total, D].

        Everything that can fail (checks, decoding, encoding the flushed chunk) runs before the layer changes, so a
        failing update leaves its layer as it was; if an earlier layer of the same forward already took the new
        tokens, the cache is marked unusable (layers disagree) and every later call says to reset() it.
        """
        who = f"{type(self).__name__}.update(layer {layer_idx})"
        self._check_usable(who)
        self._check_deferred_read(who)
        if layer_idx == 0:
            self._forward_changed = False
        try:
            return self._update(key_states, value_states, layer_idx, who)
        except BaseException as error:
            if self._forward_changed:
                self._broken = (f"{who} failed after this forward had already changed earlier layers "
                                f"({type(error).__name__}: {error})")
            raise

    def _check_deferred_read(self, who: str) -> None:
        """The previous update's deferred tokens must have been read by attention (the next layer's predictor needs
        their reconstruction, and attention without them would have been wrong)."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None and not deferred.consumed:
            self._broken = (f"layer {deferred.layer_idx}'s attention did not read its {deferred.num_quantized} "
                            f"compressed tokens (the model's attention implementation must stay "
                            f"{attention_module.NAME!r} while a cache with attention='blockwise' serves it)")
            self._check_usable(who)

    def _check_usable(self, who: str) -> None:
        if self._broken is not None:
            raise RuntimeError(f"{who}: this cache is unusable: {self._broken}. Call reset() to use it again")

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, who: str) -> KV:
        layer = self.layers[layer_idx]
        batch, heads, length, head_dim = key_states.shape
        if layer.is_initialized and batch != layer.batch:
            raise ValueError(f"{who}: batch size {batch} but the cache holds batch {layer.batch}; reset() it first")
        positions = self.positions
        if layer_idx == 0:
            lengths = [lay.get_seq_length() for lay in self.layers]
            if len(set(lengths)) > 1:
                self._broken = f"an earlier forward did not update every layer (layer lengths {lengths})"
                self._check_usable(who)
            self._prev = self._rope = None
            if self.tracker is not None:
                new_pos = self.tracker.take(batch, length, who).to(torch.int32)
                positions = new_pos if positions is None else torch.cat([positions, new_pos], dim=1)
        elif layer.get_seq_length() + length != self.layers[0].get_seq_length():
            raise RuntimeError(f"{who}: {layer.get_seq_length()} cached + {length} new tokens but layer 0 holds "
                               f"{self.layers[0].get_seq_length()}: layers must be updated in order 0..L-1 in every "
                               f"forward")
        if isinstance(layer, WindowLayer):  # an exact local layer: nothing to compress, nothing to predict
            keys, values = layer.update(key_states, value_states)
            self._forward_changed = True
            self.positions = positions
            self._end_of_layer(layer_idx)
            return keys, values

        # The layer's next state, built aside: nothing below changes the layer until every step has succeeded.
        k_new, v_new = key_states.to(self.storage_dtype), value_states.to(self.storage_dtype)
        take = max(min(self.sinks - layer.num_sinks, length), 0)
        sink_k, sink_v, buf_k, buf_v = layer.sink_k, layer.sink_v, layer.buf_k, layer.buf_v
        if take:
            sink_k, sink_v = _cat(sink_k, k_new[:, :, :take]), _cat(sink_v, v_new[:, :, :take])
        if length > take:
            buf_k, buf_v = _cat(buf_k, k_new[:, :, take:]), _cat(buf_v, v_new[:, :, take:])
        sinks, old, buffered = layer.num_sinks + take, layer.num_quantized, layer.num_buffered + length - take

        # What attention reads: sinks | quantized tokens as decoded before this call's flush | the buffer (the
        # tokens this call flushes are returned exact). Blockwise, the quantized tokens are left out of the returned
        # tensors and rebuilt inside attention (`aquakv.kv.attention`).
        defer = old > 0 and self.attention == "blockwise" and attention_module.is_installed(self._model_config)
        middle = 0 if defer else old
        keys = key_states.new_empty((batch, heads, sinks + middle + buffered, head_dim))
        values = value_states.new_empty(keys.shape)
        if sinks:
            keys[:, :, :sinks], values[:, :, :sinks] = sink_k, sink_v
        if buffered:
            keys[:, :, sinks + middle:], values[:, :, sinks + middle:] = buf_k, buf_v
        flush = buffered >= self.buffer
        store, prev, deferred = layer.store, None, None
        if defer:
            store, prev, deferred = self._defer_quantized(layer_idx, layer.store, positions, sinks, old,
                                                          buffered if flush else 0, buf_k, buf_v, keys, values,
                                                          length)
        elif old or flush:
            store, prev = self._update_quantized(layer_idx, layer.store, positions, sinks, old, buffered if flush else 0,
                                                 buf_k, buf_v, keys[:, :, sinks:sinks + old],
                                                 values[:, :, sinks:sinks + old])

        # Commit.
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        self._forward_changed = True
        layer.sink_k, layer.sink_v, layer.num_sinks = sink_k, sink_v, sinks
        if flush:
            layer.store, layer.num_quantized, buf_k, buf_v, buffered = store, old + buffered, None, None, 0
        layer.buf_k, layer.buf_v, layer.num_buffered = buf_k, buf_v, buffered
        self.positions = positions
        if prev is not None:
            self._prev = (layer_idx, prev)
        self._end_of_layer(layer_idx)
        self._deferred = deferred
        if deferred is not None:
            attention_module.defer(deferred)
        return keys, values

    def _end_of_layer(self, layer_idx: int) -> None:
        """The reconstruction kept for the next compressed layer and the cos/sin serve only the forward in
        progress: dropped after the last layer, which leaves nothing half-done."""
        if layer_idx == len(self.layers) - 1:
            self._prev = self._rope = None
            self._forward_changed = False

    def _block_tokens(self, q_len: int, channels: int) -> int:
        """Tokens per block of blockwise attention for q_len queries over `channels` = H * D."""
        if self.block_tokens is not None:
            return self.block_tokens
        per_token = 4 * self._query_heads * q_len + 16 * channels  # scores; keys, values and their float32 hats
        return max(MIN_BLOCK_TOKENS, BLOCK_BYTES // per_token)

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype = torch.float32) -> list[KV]:
        """Every layer's keys (post-RoPE) and values [B, H, T, D] as the next forward would read them.

        For inspection and error measurements (e.g. against a DynamicCache): it holds all layers at once, which
        the cache itself never does.
        """
        self._check_usable(f"{type(self).__name__}.materialize")
        out, prev, cos_sin = [], None, {}  # cos/sin per layer kind (RotaryTracker.kind)
        for layer_idx, layer in enumerate(self.layers):
            if isinstance(layer, WindowLayer):  # what the next forward reads of it: the window
                out.append((layer.keys.to(dtype), layer.values.to(dtype)) if layer.num_buffered else
                           (torch.empty(0), torch.empty(0)))
                continue
            parts = []
            if layer.num_sinks:
                parts.append((layer.sink_k, layer.sink_v))
            if layer.num_quantized:
                source = None if self.sources[layer_idx] is None else _on(prev, layer.device)
                k_hat, v_hat = self.codec.decode(layer_idx, layer.store, source)
                prev = (k_hat.to(self.chain_dtype), v_hat.to(self.chain_dtype))  # what the next layer's forward reads
                if self.codec.pre_rope:
                    kind = self.tracker.kind(layer_idx)
                    if kind not in cos_sin:  # compressed layers hold the same token layout: one range of positions
                        start = layer.num_sinks
                        cos_sin[kind] = self.tracker.cos_sin(self.positions[:, start:start + layer.num_quantized],
                                                             layer_idx)
                    k_hat = rotate(k_hat, *_on(cos_sin[kind], layer.device))
                parts.append((k_hat, v_hat))
            if layer.num_buffered:
                parts.append((layer.buf_k, layer.buf_v))
            if not parts:
                out.append((torch.empty(0), torch.empty(0)))
                continue
            out.append((torch.cat([p[0].to(dtype) for p in parts], dim=-2),
                        torch.cat([p[1].to(dtype) for p in parts], dim=-2)))
        return out

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
        total = 0
        for layer in self.layers:
            if layer.store is not None:
                total += 2 * layer.batch * layer.num_heads * layer.head_dim * layer.num_quantized
        return total

    def bits_per_value(self) -> float:
        """Bits per key/value entry of the compressed part (all codec stores); nan while nothing is compressed."""
        values = self.compressed_values()
        if not values:
            return math.nan
        return 8.0 * sum(self.codec.nbytes(layer.store) for layer in self.layers if layer.store is not None) / values

    def __repr__(self) -> str:
        n = self.get_seq_length()
        return (f"{type(self).__name__}({len(self.layers)} layers, {n} tokens, codec={type(self.codec).__name__}, "
                f"sinks={self.sinks}, buffer={self.buffer}, {self.nbytes()} bytes)")

