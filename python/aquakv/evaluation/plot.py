"""Perplexity against bits per value as a PNG (matplotlib, the optional extra `aquakv[plot]`)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from aquakv.evaluation.result import PerplexityResult


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError saying how to install it when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or pip install 'aquakv[plot]')") from None
    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity_vs_bits(rows: Sequence[tuple[str, PerplexityResult]], path: str | os.PathLike, *,
                            baseline: Optional[float] = None, title: Optional[str] = None,
                            xlabel: str = "bits per value (all bytes held)") -> Path:
    """Write a scatter of perplexity (y) against bits per value (x), one labelled point per row, to a PNG file.

    Rows without bits_per_value cannot be placed and are listed in the legend title instead. baseline: a
    perplexity drawn as a dashed horizontal line (the unquantized cache). Written atomically; returns the path.
    """
    from aquakv.atomic_writes import save_png_atomic

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot file must end in .png, got {path}")
    plt = pyplot()
    placed = [(n, r) for n, r in rows if r.bits_per_value is not None and math.isfinite(r.ppl)]
    unplaced = [n for n, r in rows if (n, r) not in placed]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for name, r in placed:
            ax.scatter([r.bits_per_value], [r.ppl], label=name, zorder=3)
            ax.annotate(name, (r.bits_per_value, r.ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if baseline is not None:
            ax.axhline(baseline, linestyle="--", color="gray", linewidth=1, label=f"baseline {baseline:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_title(title or "perplexity vs bits per value")
        ax.grid(True, alpha=0.3)
        if placed or baseline is not None:
            ax.legend(fontsize=8, title=("no size: " + ", ".join(unplaced)) if unplaced else None,
                      title_fontsize=7)
        save_png_atomic(fig, path)
    finally:
        plt.close(fig)
    return path
