"""The one results table: Markdown, one row per method, perplexity relative to a baseline."""
from __future__ import annotations

from typing import Optional, Sequence

from aquakv.evaluation.accounting import relative_increase
from aquakv.evaluation.result import PerplexityResult

# What the bits/value column of every KV table counts; printed under the tables so readers never guess.
BITS_NOTE = ("bits/value: all bytes held per window (codes, scales, zero points, and the fp16 attention sinks and "
             "recent-token buffer every quantized cache keeps) over all cached keys and values")


def count(n: int, noun: str) -> str:
    """'1 window', '4 windows': every printed count agrees with its noun."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "n/a"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def format_table(rows: Sequence[tuple[str, PerplexityResult]], baseline: Optional[float] = None,
                 baseline_name: str = "fp16", bits_name: str = "bits/value", bits_digits: int = 2) -> str:
    """A Markdown table: method | <bits_name> | KV bytes | perplexity | [predicted ppl |] vs <baseline_name> | time.

    KV bytes are per window (one sequence of `window` tokens). baseline: perplexity the "vs" column is relative to
    (empty cells without one). The "predicted ppl" column appears when any row has `predicted_ppl`.
    """
    predicted = any(r.predicted_ppl is not None for _, r in rows)
    sized = any(r.kv_bytes is not None for _, r in rows)
    head = ["method", bits_name, *(["KV bytes"] if sized else []), "perplexity",
            *(["predicted ppl"] if predicted else []), f"vs {baseline_name}", "eval time"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in rows:
        cells = [name, "n/a" if r.bits_per_value is None else f"{r.bits_per_value:.{bits_digits}f}",
                 *([_size(r.kv_bytes)] if sized else []), f"{r.ppl:.3f}"]
        if predicted:
            cells.append("" if r.predicted_ppl is None else f"{r.predicted_ppl:.3f}")
        cells += ["" if baseline is None else f"{100 * relative_increase(r.ppl, baseline):+.2f}%", _seconds(r.seconds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
