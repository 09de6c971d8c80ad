"""Reference caches the compressed ones are compared with: fp16 storage, and transformers' own QuantizedCache
with the storage it really holds reported."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from aquakv.kv.cache_state import LocalLayer
from aquakv.kv.local_layers import sliding_layers


class Fp16Layer(DynamicLayer):
    """A DynamicLayer that stores fp16 and hands the model its own dtype."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = self.keys.half(), self.values.half()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states.half(), value_states.half())
        return keys.to(key_states.dtype), values.to(value_states.dtype)


class Fp16Cache(Cache):
    """Unquantized cache storing keys and values in fp16 whatever the model's dtype: the usual serving baseline
    (an fp32 CPU model's DynamicCache would hold 32 bits per value). Sliding-window layers keep only their window,
    as in DynamicCache(config=...)."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config.get_text_config(decoder=True)
        sliding = sliding_layers(cfg)
        super().__init__(layers=[LocalLayer(sliding[i], torch.float16) if i in sliding else Fp16Layer()
                                 for i in range(cfg.num_hidden_layers)])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def transformers_cache_backends() -> dict[str, Optional[str]]:
    """Backends of transformers.QuantizedCache -> None if usable here, else why not.

    fp8 is built into transformers (per-tensor fp8 e4m3, scale frozen after the first update);
    quanto and hqq need optional packages (optimum-quanto, hqq).
    """
    import importlib.util

    def missing(module: str, package: str) -> Optional[str]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"needs the `{package}` package"

    return {"quanto": missing("optimum.quanto", "optimum-quanto"), "hqq": missing("hqq", "hqq"),
            "fp8": None if hasattr(torch, "float8_e4m3fn") else "needs torch with float8_e4m3fn"}


def _hf_layer_nbytes(layer) -> tuple[Optional[int], int]:
    """(stored bytes or None when the backend's storage is opaque, logical value count) of one layer."""
    from transformers.cache_utils import Fp8QuantizedLayer

    n_values = 0
    nbytes: Optional[int] = None
    q_keys, q_values = getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)
    if isinstance(layer, Fp8QuantizedLayer) and q_keys is not None:
        (k, k_scale), (v, v_scale) = q_keys, q_values
        nbytes = sum(t.numel() * t.element_size() for t in (k, k_scale, v, v_scale))
        n_values = k.numel() + v.numel()
    return nbytes, n_values


def transformers_quantized_factory(backend: str = "fp8", bits: int = 4) -> Callable[[torch.nn.Module], Cache]:
    """A cache_factory building transformers.QuantizedCache(backend, ...) with `nbytes` / `bits_per_value`.

    Storage is reported for the fp8 backend only (quanto and hqq keep it in opaque objects: None).
    Raises RuntimeError when the backend is not installed (see `transformers_cache_backends`).
    """
    from transformers import QuantizedCache

    why_not = transformers_cache_backends().get(backend, f"unknown backend {backend!r}")
    if why_not is not None:
        raise RuntimeError(f"transformers QuantizedCache backend {backend!r} is unavailable: {why_not}")

    class _MeasuredQuantizedCache(QuantizedCache):
        def nbytes(self) -> Optional[int]:
            sizes = [_hf_layer_nbytes(layer)[0] for layer in self.layers]
            return None if any(s is None for s in sizes) else sum(sizes)

        def bits_per_value(self) -> Optional[float]:
            nbytes = self.nbytes()
            values = sum(_hf_layer_nbytes(layer)[1] for layer in self.layers)
            return 8.0 * nbytes / values if nbytes is not None and values else None

    if backend == "fp8":
        return lambda model: _MeasuredQuantizedCache("fp8", model.config)
    return lambda model: _MeasuredQuantizedCache(backend, model.config, nbits=bits)
