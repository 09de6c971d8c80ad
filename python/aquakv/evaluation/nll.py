"""Next-token negative log-likelihood: one definition for perplexity, sensitivities and fine-tuning losses."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from aquakv.hf_compat import cache_kwargs


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] predicting targets [B, T] -> NLL in nats [B, T], float32 (softmax in float32)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return nll.view(targets.shape)


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, cache=None, step: int | None = None,
               on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Summed NLL (nats, float64 [B]) of the T - 1 next-token predictions inside each window of ids [B, T].

    step None: one forward over the whole window without a KV cache. Otherwise the window is fed `step` tokens at a
    time into `cache` (None: the model makes its own), so later tokens attend to states that went through it.
    on_step(done, n): called after each of the n forwards (progress of a long window; stepped mode only).
    """
    batch, window = ids.shape
    if step is None:
        logits = model(input_ids=ids, use_cache=False).logits
        return token_nll(logits[:, :-1], ids[:, 1:]).double().sum(-1)
    total = torch.zeros(batch, dtype=torch.float64, device=ids.device)
    n_steps = -(-window // step)
    for i, start in enumerate(range(0, window, step)):
        end = min(start + step, window)
        logits = model(input_ids=ids[:, start:end], use_cache=True, **cache_kwargs(model, cache)).logits
        n_pred = min(end, window - 1) - start  # the window's last token has no target inside the window
        if n_pred > 0:
            total += token_nll(logits[:, :n_pred], ids[:, start + 1: start + 1 + n_pred]).double().sum(-1)
        if on_step is not None:
            on_step(i + 1, n_steps)
    return total
