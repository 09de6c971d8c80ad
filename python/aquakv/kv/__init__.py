"""KV-cache compression: the chunking policy and codec protocol, the AQUA-KV, HIGGS and KIVI caches, AQUA-KV's
predictors and their calibration, and the rotary bookkeeping of caches that store keys before RoPE.

    preds = aquakv.kv.calibrate(model, texts, tokenizer=tok, bits=2)     # also aquakv.calibrate
    cache = aquakv.kv.AquaKVCache(model, preds)                          # model(..., cache=cache), generate()
"""
from aquakv.kv.aqua import AquaKVCache, AquaKVCodec
from aquakv.kv.baselines import Fp16Cache
from aquakv.kv.calibration import calibrate
from aquakv.kv.codec import KVCodec
from aquakv.kv.higgs import HiggsCache
from aquakv.kv.kivi import KiviCache, KiviCodec
from aquakv.kv.policy import ChunkedKVCache
from aquakv.kv.predictors import AffineMap, AquaKVPredictors, AquaKVSettings

__all__ = ["AffineMap", "AquaKVCache", "AquaKVCodec", "AquaKVPredictors", "AquaKVSettings", "ChunkedKVCache",
           "Fp16Cache", "HiggsCache", "KVCodec", "KiviCache", "KiviCodec", "calibrate"]
