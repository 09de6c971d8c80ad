"""aquakv: KV-cache and weight compression (AQUA-KV, HIGGS) with CPU and CUDA kernels.

    import aquakv
    q = aquakv.HiggsQuantizer(bits=2, dim=2, group_size=64)
    preds = aquakv.calibrate(model, token_ids, bits=2)
    cache = aquakv.AquaKVCache(model, preds)      # model(..., cache=cache), generate(..., cache=cache)

`import aquakv` is light: it imports neither torch nor the compiled extension, so `aquakv --help` answers at
once. Every public name is imported on first use (module __getattr__). The compiled ops torch.ops.aquakv.* are
registered by `import aquakv.ops` (or `aquakv._C`), which happens as soon as any name that needs them is used
(aquakv.HiggsQuantizer, aquakv.ops, aquakv.AquaKVCache, ...). Code that calls torch.ops.aquakv.* directly
imports aquakv.ops first.
"""
import importlib

# Public name -> module that defines it. Everything here pulls in torch (and some names transformers).
_LAZY = {
    "HiggsQuantizer": "aquakv.quantizer",
    "HiggsSettings": "aquakv.quantizer",
    "QuantizedTensor": "aquakv.quantizer",
    "calibrate": "aquakv.kv",
    "AquaKVPredictors": "aquakv.kv",
    "AquaKVCache": "aquakv.kv",
    "HiggsCache": "aquakv.kv",
    "KiviCache": "aquakv.kv",
    "evaluate_perplexity": "aquakv.evaluation",
    "PerplexityResult": "aquakv.evaluation",
}
# Subpackages reachable as attributes (aquakv.grids.get_grid(...)) without an explicit import.
_SUBMODULES = ("grids", "ops", "weights", "kv", "evaluation", "quantizer", "models", "data", "atomic_writes")


def __getattr__(name: str):
    if name == "__version__":
        from aquakv.version import version

        value = version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"aquakv.{name}")
    else:
        raise AttributeError(f"module 'aquakv' has no attribute {name!r}")
    globals()[name] = value  # the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["__version__", *_LAZY, *_SUBMODULES]
