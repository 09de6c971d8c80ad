"""aquakv: KV-cache and weight compression (AQUA-KV, HIGGS) with CPU and CUDA kernels.

    import aquakv
    q = aquakv.HiggsQuantizer(bits=2, dim=2, group_size=64)
    preds = aquakv.calibrate(model, token_ids, bits=2)
    cache = aquakv.AquaKVCache(model, preds)      # model(..., cache=cache), generate(..., cache=cache)

`import aquakv` alone is light: it imports neither torch nor the compiled extension, so `aquakv --help` answers at
once, and every public name is imported on first use (aquakv.lazy). When torch is already imported, `import aquakv`
also loads the compiled ops, so `import torch, aquakv` makes torch.ops.aquakv.* callable, as torchao does for its
ops; otherwise they load with the first name that needs them (aquakv.HiggsQuantizer, aquakv.ops, ...), or with
`import aquakv.ops`.
"""
import sys

from aquakv.lazy import lazy_exports

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
_SUBMODULES = ("grids", "ops", "weights", "kv", "evaluation", "longctx", "quantizer", "models", "data",
               "atomic_writes", "progress")

__getattr__, __dir__, __all__ = lazy_exports(__name__, {"__version__": ".version", **_LAZY,
                                                        **dict.fromkeys(_SUBMODULES)})

if "torch" in sys.modules:  # torch is loaded anyway: register torch.ops.aquakv.* now (the cost is the extension)
    try:
        from aquakv import ops  # noqa: F401
    except ImportError:  # an unbuilt extension: reported where an op is first used, not by `import aquakv`
        pass
