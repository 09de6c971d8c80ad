"""Rotary position embedding bookkeeping for caches that store keys BEFORE RoPE.

transformers 5.x hands `Cache.update` post-RoPE keys and no cos/sin. A `RotaryTracker` hooks the model's
rotary embedding module to learn the positions of the current forward, and evaluates that same module on
stored positions to undo or redo the rotation (`unrotate` / `rotate`, rotate-half convention of Llama).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn


def find_rotary_module(model: nn.Module) -> nn.Module:
    """The model's single rotary embedding module (named `rotary_emb`, e.g. `model.model.rotary_emb`)."""
    found = [(name, m) for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise ValueError(f"expected exactly one rotary embedding module named 'rotary_emb' in the model, found "
                         f"{len(found)} {names}; pass rotary= explicitly")
    return found[0][1]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply RoPE like the model does: x * cos + rotate_half(x) * sin. x: [B, H, T, D]; cos, sin: [B, T, D].

    out: a [B, H, T, D] tensor or view (e.g. a slice of the keys handed to attention) to write into, in any float
    dtype; the arithmetic is float32 and rounded once. Written half by half with mul + addcmul, so decoding
    every cached token at every step makes two passes instead of rotate_half's copies. Returns out (or a new
    float32 tensor).
    """
    h = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    res = out if out is not None and out.dtype == torch.float32 else x.new_empty(x.shape, dtype=torch.float32)
    x1, x2 = x[..., :h], x[..., h:]
    torch.mul(x1, cos[..., :h], out=res[..., :h]).addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=res[..., h:]).addcmul_(x1, sin[..., h:])
    if out is None or res is out:
        return res
    return out.copy_(res)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`. x: [B, H, T, D]; cos, sin: [B, T, D] -> [B, H, T, D].

    Each (i, i + D/2) pair is rotated by one angle and scaled by s = sqrt(cos^2 + sin^2) (the module's
    `attention_scaling`, 1 for plain RoPE), so the inverse is the transposed rotation divided by s^2.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos - _rotate_half(x) * sin) / (cos * cos + sin * sin)


class RotaryTracker:
    """Records the `position_ids` of every forward through the model's rotary module; computes cos/sin.

    The hook only holds a weak reference to the tracker; it is removed by `close()` or when the tracker is
    garbage-collected, whichever comes first.
    """

    def __init__(self, model: nn.Module, rotary: nn.Module | None = None):
        self.module = rotary if rotary is not None else find_rotary_module(model)
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
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def take(self, batch: int, length: int, who: str) -> torch.Tensor:
        """The positions recorded by the latest forward as LongTensor [batch, length]; clears the record.

        Raises if nothing new was recorded or the shape does not fit the incoming keys: without the right
        positions a pre-RoPE cache would silently corrupt its keys.
        """
        if self.closed:
            raise RuntimeError(f"{who}: the cache was closed (its rotary hook removed); create a new cache")
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
        return pos.expand(batch, length).long()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] integer -> (cos, sin), each float32 [B, T, D], as the model computes them.

        Calls `module.forward` directly: hooks (ours included) must not see these synthetic positions.
        """
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        cos, sin = self.module.forward(probe, positions.long())
        return cos.float(), sin.float()
