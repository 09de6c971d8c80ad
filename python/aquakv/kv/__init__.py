"""KV-cache compression: the codec protocol (`aquakv.kv.codec`) and its codecs (AQUA-KV, HIGGS as AQUA-KV with a zero
prediction, KIVI), AQUA-KV's predictors and their calibration, the transformers cache over any codec
(`aquakv.kv.cache`), the comparison-cache registry, and the rotary bookkeeping of caches that store keys before RoPE.

    preds = aquakv.kv.calibrate(model, texts, tokenizer=tok, bits=2)     # also aquakv.calibrate
    cache = aquakv.kv.AquaKVCache(model, preds)                          # model(..., cache=cache), generate()

Names load on first use, so `aquakv.kv.registry` (and the command line's --help) stays free of torch.
"""
from aquakv.lazy import lazy_exports

_LAZY = {
    "AquaKVCache": "cache_presets", "HiggsCache": "cache_presets", "KiviCache": "cache_presets",
    "ChunkedKVCache": "cache", "Fp16Cache": "baselines",
    "KVCodec": "codec", "AquaKVCodec": "aqua_codec", "KiviCodec": "kivi",
    "AquaKVPredictors": "predictors", "AquaKVSettings": "predictor_settings",
    "calibrate": "calibration",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, {name: f".{module}" for name, module in _LAZY.items()})
