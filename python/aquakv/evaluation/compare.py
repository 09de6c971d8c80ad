"""Several caches measured on the same windows with the same protocol: what `aquakv eval` and the demo print."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from aquakv.evaluation.result import PerplexityResult


@dataclass
class Comparison:
    """rows: (label, result) in the order measured; skipped: (label, why) for caches unavailable here."""

    rows: list[tuple[str, PerplexityResult]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def ppl(self, label: str) -> float:
        return dict(self.rows)[label].ppl

    def never_compressed(self, window: int) -> list[str]:
        """One line per row whose cache quantized nothing (compressed_values == 0): its number is an exact
        cache's, whatever its label says, and a table alone would not tell."""
        return [f"{label}: nothing was quantized: every token of a {window}-token window stayed in the cache's exact "
                f"sinks and recent buffer, so this row measures an unquantized cache (use a longer window)"
                for label, r in self.rows if r.never_compressed]

    def table(self) -> str:
        """The Markdown table, relative to the first row (the unquantized reference)."""
        from aquakv.evaluation.table import format_table

        return format_table(self.rows, baseline=self.rows[0][1].ppl if self.rows else None,
                            baseline_name=self.rows[0][0].split(" ")[0] if self.rows else "fp16")


def compare_caches(model, token_ids, rows: Sequence, *, window: int = 1024, step: int | None = 32,
                   max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> Comparison:
    """Measure each registry row (aquakv.kv.registry.Row: label, factory or None, unavailable) with
    `evaluate_perplexity` on the same windows; rows without a factory are recorded as skipped.

    evaluate_perplexity logs each row as it finishes (INFO: stderr under the CLI); nothing is printed here.
    """
    from aquakv.evaluation.perplexity import evaluate_perplexity

    out = Comparison()
    for row in rows:
        if row.factory is None:
            out.skipped.append((row.label, row.unavailable or "unavailable"))
            continue
        r = evaluate_perplexity(model, token_ids, row.factory, window=window, step=step, max_windows=max_windows,
                                batch_size=batch_size, progress=progress, desc=row.label)
        out.rows.append((row.label, r))
    return out
