"""PV-Tuning curves as one PNG: training KL loss and codes changed per step, held-out perplexity per evaluation
and the guard's validation perplexity (dashed), one colour per run (matplotlib, the optional extra `aquakv[plot]`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from aquakv.weights.pv.settings import PVTuneResult


def plot_pv_curves(runs: Mapping[str, PVTuneResult], path: str | os.PathLike, *, baseline_ppl: float | None = None,
                   title: str | None = None) -> Path:
    """Write the curves of every run (label -> result) to a PNG, atomically; baseline_ppl: the teacher's held-out
    perplexity, drawn dashed. Returns the path."""
    from aquakv.evaluation.plot import pyplot
    from aquakv.atomic_writes import save_png_atomic

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot file must end in .png, got {path}")
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    try:
        for label, r in runs.items():
            steps = range(1, len(r.loss) + 1)
            axes[0].plot(steps, r.loss, label=label)
            axes[1].plot(steps, r.codes_changed, label=label)
            if r.eval_steps:
                axes[2].plot(r.eval_steps, r.eval_ppl, marker="o", label=f"{label} held-out")
            if getattr(r, "val_steps", None):
                axes[2].plot(r.val_steps, r.val_ppl, marker=".", linestyle="--", label=f"{label} validation")
        if baseline_ppl is not None:
            axes[2].axhline(baseline_ppl, linestyle="--", color="gray", linewidth=1, label="teacher")
        for ax, name in zip(axes, ("training KL(teacher || student), nats/token", "codes changed per step",
                                   "perplexity (held-out; validation dashed)")):
            ax.set_xlabel("step")
            ax.set_title(name, fontsize=9)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[1].set_yscale("symlog")
        axes[2].set_yscale("log")  # a 2-bit start sits orders of magnitude above the teacher
        if title:
            fig.suptitle(title, fontsize=10)
        save_png_atomic(fig, path)
    finally:
        plt.close(fig)
    return path
