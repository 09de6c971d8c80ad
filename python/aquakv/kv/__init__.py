"""KV-cache compression: the chunking policy and codec protocol, the AQUA-KV, HIGGS and KIVI caches, AQUA-KV's
predictors and their calibration, the comparison-cache registry, and the rotary bookkeeping of caches that store
keys before RoPE.

    preds = aquakv.kv.calibrate(model, texts, tokenizer=tok, bits=2)     # also aquakv.calibrate
    cache = aquakv.kv.AquaKVCache(model, preds)                          # model(..., cache=cache), generate()

Names load on first use, so `aquakv.kv.registry` (and the command line's --help) stays free of torch.
"""
import importlib

_LAZY = {
    "AffineMap": "aquakv.kv.predictors",
    "AquaKVCache": "aquakv.kv.aqua",
    "AquaKVCodec": "aquakv.kv.aqua",
    "AquaKVPredictors": "aquakv.kv.predictors",
    "AquaKVSettings": "aquakv.kv.predictors",
    "ChunkedKVCache": "aquakv.kv.policy",
    "Fp16Cache": "aquakv.kv.baselines",
    "HiggsCache": "aquakv.kv.higgs",
    "HiggsCodec": "aquakv.kv.higgs",
    "KVCodec": "aquakv.kv.codec",
    "KiviCache": "aquakv.kv.kivi",
    "KiviCodec": "aquakv.kv.kivi",
    "calibrate": "aquakv.kv.calibration",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'aquakv.kv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
