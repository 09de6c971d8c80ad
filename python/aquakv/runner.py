"""Running a decoder-only model one block at a time, with the arguments the model's own forward passes its blocks.

Three jobs need this: KV calibration (run every window through layer l, keep its keys and values, move on to l + 1,
so memory holds one layer's hidden states), weight sensitivities (noise in block k leaves blocks < k unchanged, so
only blocks k.. need re-running), and block-wise fine-tuning of a quantized student. All of them capture what
enters a block during one ordinary forward (hidden states [B, T, H] and the keyword arguments: causal mask, rotary
cos/sin, positions, cache) and then call the blocks themselves.

    runner = LayerRunner(model)
    trace = runner.record(ids)                   # inputs of every block and of the final norm, and the logits
    logits = runner.replay(trace, start=k)       # blocks k.. then norm + head: equals trace.logits when unchanged

Works for models whose decoder (`model.get_decoder()`) holds an nn.ModuleList `layers` called with keyword
arguments only (the Llama family and most transformers decoders). Callers that depend on replay being exact check
it once against a full forward (see aquakv.weights.sensitivities) and fall back to full forwards otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_NORM_NAMES = ("norm", "final_layernorm", "ln_f")  # Llama/Mistral/Qwen, Phi, Falcon


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (`model.get_decoder()`, else the model itself)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (`model.model.layers` for the Llama family)."""
    layers = getattr(decoder_of(model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected a ModuleList `layers` "
                         f"on its decoder, as in Llama-family models)")
    return layers


def final_norm(model: nn.Module) -> nn.Module | None:
    """The normalization between the last block and the head, or None when the decoder has none we know."""
    body = decoder_of(model)
    for name in _NORM_NAMES:
        norm = getattr(body, name, None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """The output projection to the vocabulary (`get_output_embeddings()`), or None."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


@dataclass
class BlockInputs:
    """What enters one block: hidden states [B, T, H] and the keyword arguments the model passed with them (they
    depend on the batch shape and positions, not on the tokens' values)."""

    hidden: torch.Tensor
    kwargs: dict = field(default_factory=dict)


@dataclass
class Trace:
    """One recorded forward: the inputs of every block, of the final norm, and the model's logits [B, T, V]."""

    blocks: list[BlockInputs]
    final: BlockInputs
    logits: torch.Tensor


class _Reached(Exception):
    """Raised by a hook to stop a forward once it has seen what it was waiting for."""


def _split_call(args: tuple, kwargs: dict, what: str) -> BlockInputs:
    if len(args) > 1:
        raise ValueError(f"{what} takes positional arguments beyond the hidden states; running it block by block "
                         f"needs keyword arguments (Llama-family models)")
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return BlockInputs(hidden, kwargs)


def _hidden_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class LayerRunner:
    """Captures block inputs from a model's forward and re-runs blocks from any index to the end."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.decoder = decoder_of(model)
        self.layers = decoder_layers(model)
        self.norm = final_norm(model)
        self.head = output_head(model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def can_replay_logits(self) -> bool:
        """Whether the final norm and the head were found, so `record`/`replay` can reach the logits."""
        return self.norm is not None and self.head is not None

    @torch.no_grad()
    def first_block_inputs(self, ids: torch.Tensor, **forward_kwargs) -> BlockInputs:
        """Run the decoder on ids [B, T] until its first block and return that block's inputs (the rest of the
        forward is skipped). forward_kwargs go to the decoder's forward (use_cache, the cache, ...)."""
        seen: dict = {}

        def hook(module, args, kwargs):
            seen["inputs"] = _split_call(args, kwargs, "the first decoder layer")
            raise _Reached

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.decoder(input_ids=ids, **forward_kwargs)
        except _Reached:
            pass
        finally:
            handle.remove()
        if "inputs" not in seen:
            raise RuntimeError("the model's forward never reached its first decoder layer")
        return seen["inputs"]

    @torch.no_grad()
    def record(self, ids: torch.Tensor, **forward_kwargs) -> Trace:
        """One full forward of the model on ids [B, T] (use_cache=False unless forward_kwargs say otherwise),
        recording the inputs of every block and of the final norm. Needs `can_replay_logits`."""
        if not self.can_replay_logits:
            raise ValueError(f"cannot find the final norm and output head of {type(self.model).__name__}")
        blocks: list[BlockInputs | None] = [None] * self.num_layers
        final: dict = {}

        def hook(index):
            def keep(module, args, kwargs):
                inputs = _split_call(args, kwargs, f"decoder layer {index}")
                if index == self.num_layers:
                    final["inputs"] = inputs
                else:
                    blocks[index] = inputs
            return keep

        handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(self.layers)]
        handles.append(self.norm.register_forward_pre_hook(hook(self.num_layers), with_kwargs=True))
        try:
            logits = self.model(input_ids=ids, **{"use_cache": False, **forward_kwargs}).logits
        finally:
            for h in handles:
                h.remove()
        if any(b is None for b in blocks) or "inputs" not in final:
            raise RuntimeError("the model's forward skipped a decoder layer or the final norm")
        return Trace(blocks, final["inputs"], logits)

    def run_block(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Block `index` on hidden [B, T, H] with the given keyword arguments -> its output hidden states."""
        return _hidden_of(self.layers[index](hidden, **kwargs))

    def replay(self, trace: Trace, start: int = 0, stop: int | None = None, *, logits: bool = True) -> torch.Tensor:
        """Re-run blocks start..stop-1 (stop: all) from the recorded input of block `start`, each with its own
        recorded arguments; with logits (and stop at the end) then the final norm and the head -> [B, T, V].
        start == num_layers re-runs only norm + head. Returns hidden states [B, T, H] when not logits."""
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"replay: need 0 <= start <= stop <= {self.num_layers}, got start={start}, stop={stop}")
        hidden = trace.blocks[start].hidden if start < self.num_layers else trace.final.hidden
        for i in range(start, stop):
            hidden = self.run_block(i, hidden, trace.blocks[i].kwargs)
        if not logits:
            return hidden
        if stop != self.num_layers:
            raise ValueError("replay: logits need every block up to the last (stop=None)")
        return self.head(self.norm(hidden, **trace.final.kwargs))

    def block_of(self, module: nn.Module) -> int | None:
        """Index of the first block whose output `module` changes: its block, num_layers for the final norm or the
        head, None when it is in neither (embeddings)."""
        for i, block in enumerate(self.layers):
            if any(m is module for m in block.modules()):
                return i
        for tail in (self.norm, self.head):
            if tail is not None and any(m is module for m in tail.modules()):
                return self.num_layers
        return None
