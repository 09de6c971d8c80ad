"""aquakv: KV-cache and weight compression (AQUA-KV, HIGGS) with CPU and CUDA kernels.

    import aquakv
    q = aquakv.HiggsQuantizer(bits=2, dim=2, group_size=64)
    preds = aquakv.calibrate(model, token_ids, bits=2)
    cache = aquakv.AquaKVCache(model, preds)      # model(..., cache=cache), generate(..., cache=cache)
"""
import importlib

import torch  # noqa: F401  (must load libtorch before the extension that links against it)

from aquakv import _C  # noqa: F401  (loads the compiled library: registers torch.ops.aquakv.*)
from aquakv import grids, ops  # noqa: F401  (ops: fake kernels for torch.compile)
from aquakv.quantizer import HiggsQuantizer, HiggsSettings, QuantizedTensor

__version__ = _C.__version__

# Names whose modules pull in transformers are imported on first use, so `import aquakv` stays light.
_LAZY = {
    "calibrate": "aquakv.kv",
    "AquaKVPredictors": "aquakv.kv",
    "AquaKVCache": "aquakv.kv",
    "HiggsCache": "aquakv.kv",
    "KiviCache": "aquakv.kv",
    "evaluate_perplexity": "aquakv.evaluation",
    "weights": "aquakv.weights",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'aquakv' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "weights" else getattr(module, name)


__all__ = ["HiggsQuantizer", "HiggsSettings", "QuantizedTensor", "grids", "__version__", *_LAZY]
