"""Depth x length heatmaps of passkey accuracy, one PNG per cache (matplotlib, an optional dependency)."""
from __future__ import annotations

import re
from pathlib import Path

from aquakv.atomic_writes import save_png_atomic
from aquakv.longctx.retrieval import NeedleResult


def matplotlib_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("needle heatmaps need matplotlib: pip install matplotlib") from None
    return Figure


def heatmap_filename(cache: str) -> str:
    """`needle_<cache>.png` with every run of characters other than letters, digits, '.', '-' as one '_'."""
    return f"needle_{re.sub(r'[^A-Za-z0-9.-]+', '_', cache).strip('_') or 'cache'}.png"


def save_heatmap(result: NeedleResult, cache: str, path: str | Path) -> Path:
    """Write cache's accuracy grid as a PNG: rows the needle depth (0 at the top), columns the context length,
    each cell coloured red (0%) to green (100%) and labelled with its percentage. Atomic: a reader never sees a
    half-written file."""
    Figure = matplotlib_figure()
    grid = result.grid(cache)
    fig = Figure(figsize=(1.2 + 1.1 * len(result.lengths), 1.0 + 0.6 * len(result.depths)), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for row, values in enumerate(grid):
        for col, acc in enumerate(values):
            ax.text(col, row, f"{acc:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(f"passkey accuracy: {cache} ({result.samples} per cell)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    return save_png_atomic(fig, path)


def write_heatmaps(result: NeedleResult, directory: str | Path) -> list[Path]:
    """One `save_heatmap` PNG per cache in `directory` (created if missing), named by `heatmap_filename`."""
    matplotlib_figure()  # fail before creating anything
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [heatmap_filename(c) for c in result.caches]
    if len(set(names)) != len(names):
        raise ValueError(f"heatmaps: cache names {result.caches} give clashing file names {names}")
    return [save_heatmap(result, c, directory / n) for c, n in zip(result.caches, names)]
