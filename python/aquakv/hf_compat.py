"""Differences between transformers 5.x releases that the library must bridge.

transformers 5.24 renamed the cache argument of `forward` and `generate` from `past_key_values` to `cache`
(the old name is deprecated, to be removed from `forward` in 5.40). Releases before 5.24 know only the old name
and would silently drop an unknown `cache=` into **kwargs, so the name is read off the model's signature.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(forward_type: type) -> bool:
    return "cache" in inspect.signature(forward_type.forward).parameters


def cache_kwargs(model: nn.Module, cache) -> dict:
    """{name: cache} for `model(...)` or `model.generate(...)` under this transformers release.

    Both calls use the same name in every release (the rename came to both in 5.24), so the forward's signature
    decides for both.
    """
    return {"cache" if _forward_takes_cache(type(model)) else "past_key_values": cache}
