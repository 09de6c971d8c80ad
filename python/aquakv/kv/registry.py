"""The comparison caches, by name: what `aquakv eval --baselines` and `aquakv demo` build their rows from.

Every entry has one CLI name (fp16, kivi2, higgs, aquakv, fp8, ...), one row label used in every table and plot,
and a constructor of a cache_factory (model -> fresh cache) for `evaluate_perplexity`. Entries whose backend is
not installed stay listed and say why (`unavailable`). This module imports nothing heavy: constructors import
their cache classes when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

CacheFactory = Callable[[object], object]


@dataclass(frozen=True)
class CacheEntry:
    """One comparison cache.

    name:        what the command line calls it.
    description: one line for --help.
    needs_predictors: built from AQUA-KV predictors (aquakv, and higgs at the predictors' settings).
    """

    name: str
    description: str
    needs_predictors: bool
    _label: Callable[[Optional[object]], str]
    _build: Callable[[Optional[object], int, str], CacheFactory]
    _unavailable: Callable[[], Optional[str]] = lambda: None

    def label(self, predictors=None) -> str:
        """The row label of this cache (AQUA-KV-2, HIGGS-3 (no predictors), ...)."""
        self._need(predictors)
        return self._label(predictors)

    def unavailable(self) -> Optional[str]:
        """None when this cache can be built here, else why not (a missing package)."""
        return self._unavailable()

    def factory(self, predictors=None, seed: int = 0, attention: str = "materialize") -> CacheFactory:
        """model -> fresh cache. predictors: required when needs_predictors; seed: HIGGS sign seed of higgs2/3;
        attention: "blockwise" for the chunked caches (kivi, higgs, aquakv: see ChunkedKVCache), which the others
        ignore (they hand attention their whole state either way).
        Raises RuntimeError naming the reason when the cache is unavailable here."""
        self._need(predictors)
        why = self.unavailable()
        if why is not None:
            raise RuntimeError(f"cache {self.name!r} is unavailable: {why}")
        return self._build(predictors, seed, attention)

    def _need(self, predictors) -> None:
        if self.needs_predictors and predictors is None:
            raise ValueError(f"cache {self.name!r} is built from AQUA-KV predictors; pass predictors=")


@dataclass(frozen=True)
class Row:
    """A table row to measure: its label and factory, or the reason it cannot be measured here (factory None)."""

    name: str
    label: str
    factory: Optional[CacheFactory]
    unavailable: Optional[str] = None


def _fp16(_preds, _seed, _attention):
    from aquakv.kv.baselines import Fp16Cache

    return Fp16Cache


def _dynamic(_preds, _seed, _attention):
    from transformers.cache_utils import DynamicCache

    return lambda model: DynamicCache(config=model.config)


def _kivi(bits: int):
    def build(_preds, _seed, attention):
        from aquakv.kv.cache_presets import kivi_factory

        return kivi_factory(bits, attention=attention)
    return build


def _higgs_fixed(bits: int):
    def build(_preds, seed, attention):
        from aquakv.kv.cache_presets import HiggsCache

        return lambda model: HiggsCache(model, bits, seed=seed, attention=attention)
    return build


def _higgs_like(preds, _seed, attention):
    """HIGGS without predictors at the predictors' bits, grid, group size and sign seed: AQUA-KV's ablation."""
    from aquakv.kv.cache_presets import HiggsCache

    s = preds.settings
    return lambda model: HiggsCache(model, s.bits, grid_dim=s.grid_dim, group_size=s.group_size, seed=s.seed,
                                    attention=attention)


def _aquakv(predictor_dtype: str):
    def build(preds, _seed, attention):
        import torch

        from aquakv.kv.cache_presets import AquaKVCache

        dtype = getattr(torch, predictor_dtype)
        return lambda model: AquaKVCache(model, preds, attention=attention, predictor_dtype=dtype)
    return build


def _hf(backend: str, bits: int):
    def build(_preds, _seed, _attention):
        from aquakv.kv.baselines import transformers_quantized_factory

        return transformers_quantized_factory(backend, bits=bits)
    return build


def _hf_missing(backend: str) -> Callable[[], Optional[str]]:
    def why() -> Optional[str]:
        from aquakv.kv.baselines import transformers_cache_backends

        return transformers_cache_backends().get(backend, f"unknown backend {backend!r}")
    return why


def _bits_label(preds) -> str:
    """'2' for uniform widths; 'mixed 2.32' (the compressed part's bits/value) for widths chosen per layer."""
    return f"mixed {preds.bits_per_value():.2f}" if preds.settings.mixed else f"{preds.settings.bits:g}"


_HF_BITS = 2  # quanto and hqq rows: 2-bit, the width the other compressed rows are compared at
_ENTRIES = (
    CacheEntry("fp16", "unquantized keys and values stored in fp16 (the reference row)", False,
               lambda p: "fp16 (unquantized)", _fp16),
    CacheEntry("dynamic", "transformers' DynamicCache: unquantized, in the model's own dtype", False,
               lambda p: "DynamicCache (model dtype)", _dynamic),
    CacheEntry("kivi4", "KIVI-style uniform 4-bit: keys per channel, values per token, groups of 32 with fp16 "
               "scale and zero point", False, lambda p: "KIVI-4", _kivi(4)),
    CacheEntry("kivi2", "KIVI-style uniform 2-bit, as kivi4", False, lambda p: "KIVI-2", _kivi(2)),
    CacheEntry("higgs2", "HIGGS without predictors at 2 bits (default grid and groups)", False,
               lambda p: "HIGGS-2 (no predictors)", _higgs_fixed(2)),
    CacheEntry("higgs3", "HIGGS without predictors at 3 bits", False, lambda p: "HIGGS-3 (no predictors)",
               _higgs_fixed(3)),
    CacheEntry("higgs", "HIGGS without predictors at the predictors' bits, grid and group size (the ablation of "
               "AQUA-KV)", True, lambda p: f"HIGGS-{p.settings.bits:g} (no predictors)", _higgs_like),
    CacheEntry("aquakv", "AQUA-KV: the predictors from `aquakv calibrate` plus HIGGS on the residual", True,
               lambda p: f"AQUA-KV-{_bits_label(p)}", _aquakv("float32")),
    CacheEntry("aquakv-bf16", "AQUA-KV with its predictor matmuls in bfloat16 (accumulated in float32): 2-4x "
               "faster matmuls on CPUs with AVX512-BF16 or AMX and on GPUs", True,
               lambda p: f"AQUA-KV-{_bits_label(p)} (bf16 predictors)", _aquakv("bfloat16")),
    CacheEntry("fp8", "transformers' QuantizedCache, fp8 backend (built into transformers)", False,
               lambda p: "transformers QuantizedCache (fp8)", _hf("fp8", _HF_BITS), _hf_missing("fp8")),
    CacheEntry("quanto", f"transformers' QuantizedCache, quanto backend at {_HF_BITS} bits (needs optimum-quanto)",
               False, lambda p: f"transformers QuantizedCache (quanto, {_HF_BITS}-bit)", _hf("quanto", _HF_BITS),
               _hf_missing("quanto")),
    CacheEntry("hqq", f"transformers' QuantizedCache, hqq backend at {_HF_BITS} bits (needs hqq)", False,
               lambda p: f"transformers QuantizedCache (hqq, {_HF_BITS}-bit)", _hf("hqq", _HF_BITS),
               _hf_missing("hqq")),
)
REGISTRY: dict[str, CacheEntry] = {e.name: e for e in _ENTRIES}


def names() -> tuple[str, ...]:
    """Every registered name, in table order."""
    return tuple(REGISTRY)


def get(name: str) -> CacheEntry:
    """The entry called `name`; ValueError listing the names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown cache {name!r}; known: {', '.join(REGISTRY)}") from None


def rows(requested, predictors=None, seed: int = 0, attention: str = "materialize") -> list[Row]:
    """Rows for the requested names in the given order (duplicates dropped); unavailable ones carry the reason."""
    out: list[Row] = []
    for name in dict.fromkeys(requested):
        entry = get(name)
        why = entry.unavailable()
        factory = None if why else entry.factory(predictors, seed, attention)
        out.append(Row(name, entry.label(predictors), factory, why))
    return out
