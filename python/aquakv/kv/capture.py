"""Pre-RoPE keys and values of calibration windows, captured one decoder layer at a time.

The decoder runs layer by layer over all windows, as sequential (GPTQ-style) calibration does: only the hidden
states entering the current layer are kept, so memory grows with tokens x hidden size, not with tokens x layers x
2C. For Llama-3-8B on 128 windows of 4096 tokens that is ~4 GB (bf16 hidden states) instead of ~69 GB of fp16
states of all 32 layers at once. Each layer is called with exactly the arguments the model's own forward passed
to it (captured by aquakv.runner.LayerRunner), so the states are the ones a full forward computes.

    for layer, keys, values in iter_layer_states(model, windows, sinks=4):   # keys, values: fp16 [N, C]
        ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from aquakv.hf_compat import cache_kwargs
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.kv.rope import RotaryTracker, unrotate
from aquakv.progress import progress as progress_bar  # `progress` is the argument that turns it on
from aquakv.runner import LayerRunner


class _LayerCapture(DynamicCache):
    """Takes one layer's update: keeps its keys un-rotated (exactly as AquaKVCache will see them) and its values,
    as fp16 rows [T - sinks, C] on `store`; stores nothing as a cache."""

    def __init__(self, config, cos_sin: tuple[torch.Tensor, torch.Tensor], sinks: int, store: torch.device):
        super().__init__(config=config)
        self.cos_sin, self.sinks, self.store = cos_sin, sinks, store
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, h, t, d = key_states.shape
        keys = unrotate(key_states.float(), *self.cos_sin)
        self.rows = tuple(x[:, :, self.sinks:].transpose(1, 2).reshape(-1, h * d).to(self.store, torch.float16)
                          for x in (keys, value_states))
        return key_states, value_states


@dataclass
class _LayerInputs:
    """What the model's forward hands its decoder layers for one window length: the keyword arguments (causal
    mask, rotary cos/sin, positions; they depend on the length only, not on the tokens), the rotary positions, and
    the cos/sin the cache un-rotates keys with, per kind of layer (`RotaryTracker.kind`: one entry for most models,
    one per layer type for Gemma 3), computed when a layer of that kind first needs them."""

    kwargs: dict
    positions: torch.Tensor
    cos_sin: dict = field(default_factory=dict)
    per_layer: list[dict] | None = None  # every layer's own kwargs, when layers differ in kind (see _record_kinds)

    def kwargs_of(self, layer_idx: int) -> dict:
        return self.kwargs if self.per_layer is None else self.per_layer[layer_idx]

    def cos_sin_of(self, tracker: RotaryTracker, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        kind = tracker.kind(layer_idx)
        if kind not in self.cos_sin:
            self.cos_sin[kind] = tracker.cos_sin(self.positions, layer_idx)
        return self.cos_sin[kind]


def _runner(model: nn.Module) -> LayerRunner:
    try:
        return LayerRunner(model)
    except ValueError as e:
        raise ValueError(f"aquakv.calibrate: {e}") from None


def _first_layer_inputs(model: nn.Module, runner: LayerRunner, window: torch.Tensor, tracker: RotaryTracker
                        ) -> tuple[torch.Tensor, _LayerInputs]:
    """Run the model on one window up to its first decoder layer: (hidden states [1, T, H], the layer inputs)."""
    try:
        inputs = runner.first_block_inputs(window[None], use_cache=True,
                                           **cache_kwargs(runner.decoder, DynamicCache(config=model.config)))
    except (ValueError, RuntimeError) as e:
        raise type(e)(f"aquakv.calibrate: {e}") from None
    positions = tracker.take(1, window.numel(), "aquakv.calibrate")
    return inputs.hidden, _LayerInputs(inputs.kwargs, positions)


def _record_kinds(model: nn.Module, runner: LayerRunner, window: torch.Tensor, inputs: _LayerInputs) -> None:
    """Layers of different kinds (Gemma 3's sliding and global layers) get different masks and rotary cos/sin from
    the model's forward, so layer 0's kwargs do not fit them all: one full forward over a window of this length
    records every layer's own (they depend on the length only). Models with one kind of layer skip it."""
    try:
        trace = runner.record(window[None], use_cache=True, **cache_kwargs(model, DynamicCache(config=model.config)))
    except (ValueError, RuntimeError) as e:
        raise type(e)(f"aquakv.calibrate: {e}") from None
    inputs.per_layer = [block.kwargs for block in trace.blocks]


def _with_cache(kwargs: dict, cache: Cache) -> dict:
    """The layer's kwargs with our capture object in place of the cache the model's forward passed."""
    out = {k: (cache if isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if not any(v is cache for v in out.values()):
        raise RuntimeError("aquakv.calibrate: the model did not pass a cache to its decoder layers")
    return out


@torch.no_grad()
def iter_layer_states(model: nn.Module, windows: list[torch.Tensor], sinks: int = 4, *, offload: bool = True,
                      progress=None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (layer, keys, values) for every decoder layer in order: pre-RoPE keys and values of all windows as fp16
    rows [N, C] (windows in order, the first `sinks` tokens of each left out: the cache keeps those exact).

    offload=True keeps the hidden states and rows on the CPU between layers; False keeps them on the model's
    device. progress: a tqdm bar to advance by one per layer, or None.
    """
    info = AquaKVPredictors.model_info_of(model)
    device = next(model.parameters()).device
    store = torch.device("cpu") if offload else device
    runner = _runner(model)
    layers = runner.layers
    if len(layers) != info["num_layers"]:
        raise ValueError(f"aquakv.calibrate: {len(layers)} decoder layers but the config says {info['num_layers']}")
    counts = [max(w.numel() - sinks, 0) for w in windows]
    total = sum(counts)

    tracker = RotaryTracker(model)
    try:
        hidden, inputs = [], {}
        for w in windows:
            h, layer_inputs = _first_layer_inputs(model, runner, w.to(device), tracker)
            hidden.append(h.to(store))
            if w.numel() not in inputs:
                inputs[w.numel()] = layer_inputs
                if not tracker.single_kind:
                    _record_kinds(model, runner, w.to(device), layer_inputs)
    finally:
        tracker.close()  # no more positions to record; cos_sin still evaluates the rotary module

    for layer_idx in range(len(layers)):
        keys = torch.empty(total, info["kv_width"], dtype=torch.float16, device=store)
        values = torch.empty_like(keys)
        start = 0
        last = layer_idx == len(layers) - 1
        for i, (h, n) in enumerate(zip(hidden, counts)):
            length = h.shape[1]
            capture = _LayerCapture(model.config, inputs[length].cos_sin_of(tracker, layer_idx), sinks, store)
            out = runner.run_block(layer_idx, h.to(device), _with_cache(inputs[length].kwargs_of(layer_idx), capture))
            if capture.rows is None:
                raise RuntimeError(f"aquakv.calibrate: decoder layer {layer_idx} did not update the cache")
            keys[start:start + n], values[start:start + n] = capture.rows
            start += n
            hidden[i] = None if last else out.to(store)
        if progress is not None:
            progress.update(1)
        yield layer_idx, keys, values


def capture_states(model: nn.Module, windows: list[torch.Tensor], sinks: int = 4, progress: bool = True
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's pre-RoPE keys and values at once: fp16 CPU rows [N, C] per layer (see `iter_layer_states`,
    which `aquakv.calibrate` uses to hold one layer at a time)."""
    keys, values = [], []
    with progress_bar(total=AquaKVPredictors.model_info_of(model)["num_layers"], desc="aquakv: capturing KV",
                      unit="layer", enabled=progress) as bar:
        for _, k, v in iter_layer_states(model, windows, sinks, progress=bar):
            keys.append(k)
            values.append(v)
    return keys, values
