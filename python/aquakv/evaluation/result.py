"""The one result type of a perplexity measurement (torch-free, so tables and plots import it cheaply)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PerplexityResult:
    """Outcome of `evaluate_perplexity` (and of the weight-quantization evaluations, which fill it the same way).

    ppl:            exp(nll).
    nll:            mean negative log-likelihood per predicted token, in nats.
    n_tokens:       number of scored predictions (n_windows * (window - 1)).
    n_windows:      number of windows evaluated.
    kv_bytes:       bytes the cache held after a full window (per window), or None when the cache does not
                    report it.
    bits_per_value: 8 * kv_bytes / (key and value elements of a full window): storage bits per cached value with
                    all bytes held counted (codes, scales, zero points, fp16 sinks and buffers); None likewise.
    seconds:        wall time of the evaluation.
    predicted_ppl:  a perplexity predicted before measuring (e.g. by the weight bit allocation), or None.
    compressed_values: key and value entries the cache held compressed after a full window (the fewest over the
                    windows), or None when the cache does not tell; 0 means nothing was quantized, so the row
                    measured an exact cache whatever its name (see `never_compressed`).
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    kv_bytes: Optional[float] = None
    bits_per_value: Optional[float] = None
    seconds: float = 0.0
    predicted_ppl: Optional[float] = None
    compressed_values: Optional[int] = None

    @property
    def never_compressed(self) -> bool:
        """True when the cache reports compressing nothing in a window (too short for its exact sinks and buffer,
        or predictors that never engaged)."""
        return self.compressed_values == 0
