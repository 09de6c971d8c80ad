"""Quality measurements: perplexity under a KV cache (DESIGN.md section 3) and the tables that report it."""
from aquakv.evaluation.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    format_table,
    relative_increase,
)

__all__ = ["PerplexityResult", "evaluate_perplexity", "format_table", "relative_increase"]
