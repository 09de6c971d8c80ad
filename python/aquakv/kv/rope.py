"""Rotary position embedding bookkeeping for caches that store keys BEFORE RoPE.

transformers 5.x hands `Cache.update` post-RoPE keys and no cos/sin. A `RotaryTracker` hooks the model's
rotary embedding module to learn the positions of the current forward, and evaluates that same module on
stored positions to undo or redo the rotation (`unrotate` / `rotate`, rotate-half convention of Llama).

What the model's rotary module decides is honoured as it is: partial rotary (cos/sin narrower than the head:
GPT-NeoX, Phi, StableLM rotate the first `rot_dim` channels and pass the rest through), rope scaling (linear,
llama3, yarn: static frequencies; yarn's attention_scaling is divided out by `unrotate`), and one module serving
several layer types (Gemma 3: `forward(x, position_ids, layer_type)` with a rope base per type).
"""
from __future__ import annotations

import copy
import inspect
import weakref

import torch
from torch import nn

# The names transformers gives a decoder's single rotary module, most common first.
ROTARY_NAMES = ("rotary_emb", "rotary_embedding", "rotary_embeddings", "rotary_pos_emb")


def _has_inv_freq(module: nn.Module) -> bool:
    return any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False))


def find_rotary_module(model: nn.Module) -> nn.Module:
    """The model's single rotary embedding module: the one named `rotary_emb` (e.g. `model.model.rotary_emb`), else
    the one with another usual name (ROTARY_NAMES), else the one module holding an `inv_freq` buffer (how every
    transformers rotary module keeps its frequencies). Several candidates at the first level that has any, or none:
    ValueError asking for rotary=."""
    modules = list(model.named_modules())
    for level, found in (("named 'rotary_emb'", [(n, m) for n, m in modules if n.split(".")[-1] == "rotary_emb"]),
                         (f"named one of {ROTARY_NAMES[1:]}",
                          [(n, m) for n, m in modules if n.split(".")[-1] in ROTARY_NAMES[1:]]),
                         ("holding an inv_freq buffer", [(n, m) for n, m in modules if _has_inv_freq(m)])):
        if len(found) == 1:
            return found[0][1]
        if found:
            raise ValueError(f"expected exactly one rotary embedding module in the model, found {len(found)} "
                             f"{level}: {[n for n, _ in found]}; pass rotary= (the module the decoder layers' "
                             f"position embeddings come from)")
    raise ValueError(f"found no rotary embedding module in {type(model).__name__} (none named {ROTARY_NAMES}, none "
                     f"holding an inv_freq buffer); pass rotary=, or use a cache that stores keys after RoPE")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_width(x: torch.Tensor, cos: torch.Tensor) -> int:
    """The number of leading channels RoPE rotates: cos's width (the head's, or less for partial rotary)."""
    r = cos.shape[-1]
    if r > x.shape[-1] or r % 2:
        raise ValueError(f"cos/sin of width {r} cannot rotate heads of width {x.shape[-1]} (need an even width <= the "
                         f"head's)")
    return r


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply RoPE like the model does: x * cos + rotate_half(x) * sin. x: [B, H, T, D]; cos, sin: [B, T, R], R <= D
    (R < D: partial rotary, the last D - R channels pass through unchanged).

    out: a [B, H, T, D] tensor or view (e.g. a slice of the keys handed to attention) to write into, in any float
    dtype; the arithmetic is float32 and rounded once. Written half by half with mul + addcmul, so decoding
    every cached token at every step makes two passes instead of rotate_half's copies. Returns out (or a new
    float32 tensor).
    """
    r = _rotary_width(x, cos)
    h = r // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    res = out if out is not None and out.dtype == torch.float32 else x.new_empty(x.shape, dtype=torch.float32)
    x1, x2 = x[..., :h], x[..., h:r]
    torch.mul(x1, cos[..., :h], out=res[..., :h]).addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=res[..., h:r]).addcmul_(x1, sin[..., h:])
    if r < x.shape[-1]:
        res[..., r:].copy_(x[..., r:])
    if out is None or res is out:
        return res
    return out.copy_(res)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`. x: [B, H, T, D]; cos, sin: [B, T, R], R <= D -> [B, H, T, D].

    Each (i, i + R/2) pair is rotated by one angle and scaled by s = sqrt(cos^2 + sin^2) (the module's
    `attention_scaling`, 1 for plain RoPE), so the inverse is the transposed rotation divided by s^2. Channels
    from R on (partial rotary) were not rotated and come back as they are.
    """
    r = _rotary_width(x, cos)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if r == x.shape[-1]:
        return (x * cos - _rotate_half(x) * sin) / (cos * cos + sin * sin)
    rot = x[..., :r]
    return torch.cat(((rot * cos - _rotate_half(rot) * sin) / (cos * cos + sin * sin), x[..., r:]), dim=-1)


def _plain_forward(module: nn.Module):
    """The module's forward without transformers' `dynamic_rope_update` wrapper (which may recompute, or reset, the
    module's frequencies from the positions it is given): evaluating stored positions must not change the model."""
    fn = type(module).forward
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is not None and fn.__code__.co_filename.endswith("modeling_rope_utils.py"):
        return lambda *args, **kwargs: wrapped(module, *args, **kwargs)
    return module.forward


def _layer_types_of(model: nn.Module, module: nn.Module) -> list[str] | None:
    """Per decoder layer, the layer type the rotary module's forward takes (config.layer_types), or None when its
    forward takes no layer type."""
    if "layer_type" not in inspect.signature(module.forward).parameters:
        return None
    config = getattr(module, "config", None) or model.config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    if not types:
        raise ValueError(f"the rotary module {type(module).__name__} takes a layer_type but the config has no "
                         f"layer_types")
    return list(types)


class RotaryTracker:
    """Records the `position_ids` of every forward through the model's rotary module; computes cos/sin.

    `cos_sin(positions, layer_idx)` evaluates the module for one decoder layer. Layers of the same `kind` share
    cos/sin: `kind(layer_idx)` is the layer type the module is called with (Gemma 3: 'sliding_attention' or
    'full_attention'), or None when the module serves every layer alike (`single_kind`).

    The hook only holds a weak reference to the tracker; it is removed by `close()` or when the tracker is
    garbage-collected, whichever comes first. cos_sin keeps working after close().
    """

    def __init__(self, model: nn.Module, rotary: nn.Module | None = None):
        self.module = rotary if rotary is not None else find_rotary_module(model)
        self.layer_types = _layer_types_of(model, self.module)
        self._forward = _plain_forward(self.module)
        self.last_positions: torch.Tensor | None = None  # [B or 1, T] of the latest forward, consumed by take()
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            tracker = ref()
            if tracker is not None:
                pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
                tracker.last_positions = pos.detach()

        handle = self.module.register_forward_hook(hook, with_kwargs=True)
        self._finalizer = weakref.finalize(self, handle.remove)

    def close(self) -> None:
        """Remove the hook (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def __getstate__(self) -> dict:
        """Pickled (and deep-copied) closed: the hook belongs to the live model's module, so the module goes without
        its forward hooks (a shallow copy; its buffers are shared). cos_sin keeps working."""
        module = copy.copy(self.module)
        for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            if hasattr(module, name):
                setattr(module, name, type(getattr(module, name))())
        return {"module": module, "layer_types": self.layer_types}

    def __setstate__(self, state: dict) -> None:
        self.module, self.layer_types = state["module"], state["layer_types"]
        self._forward = _plain_forward(self.module)
        self.last_positions, self._finalizer = None, None

    @property
    def single_kind(self) -> bool:
        """True when one cos/sin serves every layer (no layer types, or only one)."""
        return self.layer_types is None or len(set(self.layer_types)) == 1

    def kind(self, layer_idx: int | None) -> str | None:
        """The layer type decoder layer `layer_idx` evaluates the rotary module with (None: the module takes none).
        layer_idx may be None only when every layer is of one kind."""
        if self.layer_types is None:
            return None
        if layer_idx is None:
            if not self.single_kind:
                raise ValueError(f"the rotary module {type(self.module).__name__} computes cos/sin per layer type "
                                 f"{sorted(set(self.layer_types))}: pass layer_idx")
            return self.layer_types[0]
        if not 0 <= layer_idx < len(self.layer_types):
            raise ValueError(f"layer_idx {layer_idx} out of range for {len(self.layer_types)} layer types")
        return self.layer_types[layer_idx]

    def take(self, batch: int, length: int, who: str) -> torch.Tensor:
        """The positions recorded by the latest forward as LongTensor [batch, length]; clears the record.

        Raises if nothing new was recorded, the shape does not fit the incoming keys, or the module rescaled its
        frequencies for this forward: without the right positions and rotation a pre-RoPE cache would silently
        corrupt its keys.
        """
        if self.closed:
            raise RuntimeError(f"{who}: the cache was closed (its rotary hook removed); create a new cache, or "
                               f"attach(model) a cache restored from a pickle")
        pos, self.last_positions = self.last_positions, None
        if pos is None:
            raise RuntimeError(f"{who}: no positions were recorded for this forward: the model's rotary module "
                               f"{type(self.module).__name__} did not run before the cache update (a model that "
                               f"receives position_embeddings from outside is not supported)")
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        if pos.dim() != 2 or pos.shape[-1] != length or pos.shape[0] not in (1, batch):
            raise RuntimeError(f"{who}: recorded position_ids of shape {tuple(pos.shape)} do not match incoming keys "
                               f"with batch {batch} and {length} tokens (multi-axis RoPE is not supported)")
        self._check_frequencies(who)
        return pos.expand(batch, length).long()

    def _check_frequencies(self, who: str) -> None:
        """Dynamic NTK and LongRoPE switch to other frequencies for a forward past the original context length, so
        the keys of earlier forwards were rotated otherwise than the new ones: no single un-rotation fits them."""
        rope_type = getattr(self.module, "rope_type", None)
        types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        if not any(isinstance(t, str) and ("dynamic" in t or t == "longrope") for t in types):
            return
        buffers = dict(self.module.named_buffers(recurse=False))
        for name, freq in buffers.items():
            original = buffers.get(name.replace("inv_freq", "original_inv_freq"))
            if name.endswith("inv_freq") and "original" not in name and original is not None and \
                    not torch.equal(freq, original.to(freq.device)):
                raise RuntimeError(f"{who}: the rotary module ({sorted(set(types))} scaling) changed its frequencies "
                                   f"for a sequence past the original context length, so cached keys were rotated "
                                   f"with other frequencies than new ones; a cache that stores keys before RoPE "
                                   f"cannot reproduce that: use a post-RoPE cache (pre_rope=False) or stay within "
                                   f"the original context length")

    def cos_sin(self, positions: torch.Tensor, layer_idx: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] integer -> (cos, sin), each float32 [B, T, R], as the model computes them for decoder
        layer `layer_idx` (R: the rotated width, head_dim or less). layer_idx may be left out when every layer
        shares one cos/sin (`single_kind`).

        Calls the module's forward directly (hooks, ours included, must not see these synthetic positions) and
        without transformers' dynamic-frequency wrapper (evaluating old positions must not reset the module).
        """
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        kind = self.kind(layer_idx)
        kwargs = {} if kind is None else {"layer_type": kind}
        cos, sin = self._forward(probe, positions.long(), **kwargs)
        return cos.float(), sin.float()
