"""Quality measurements: perplexity under a KV cache (docs/evaluation.md), the table and plot that report it.

    cut_windows (windows.py)           the one window cutter
    token_nll, window_nll (nll.py)     the one next-token NLL
    evaluate_perplexity (perplexity.py) the protocol; PerplexityResult (result.py) its outcome
    format_table (table.py), plot_perplexity_vs_bits (plot.py)
    kv_values, cache_nbytes, relative_increase (accounting.py)

Names are imported on first use: the table and result type need neither torch nor transformers.
"""
from aquakv.lazy import lazy_exports

_LAZY = {
    "PerplexityResult": "result", "format_table": "table", "BITS_NOTE": "table",
    "plot_perplexity_vs_bits": "plot", "relative_increase": "accounting", "kv_values": "accounting",
    "cache_nbytes": "accounting", "evaluate_perplexity": "perplexity", "default_cache_factory": "perplexity",
    "cut_windows": "windows", "token_nll": "nll", "window_nll": "nll",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, {name: f".{module}" for name, module in _LAZY.items()})
