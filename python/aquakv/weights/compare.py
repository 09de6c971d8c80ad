"""The comparison table of a weight quantization: perplexity of the unquantized model, RTN at the uniform width,
HIGGS uniform, and HIGGS + DP when the plan ran the DP (what `quantize-weights --eval` prints).

Every row is one forward per window (no KV cache) over the same windows, with a progress bar on a terminal and a
line every ~10 s in a redirected log (aquakv.progress): a row of 16 windows of 1024 tokens takes a minute or more.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Callable

import torch
from torch import nn

from aquakv.evaluation.nll import window_nll
from aquakv.evaluation.result import PerplexityResult
from aquakv.evaluation.windows import cut_windows
from aquakv.progress import progress as progress_bar
from aquakv.weights.allocate import predicted_delta_nll
from aquakv.weights.plan import WeightPlan, WeightSettings
from aquakv.weights.quantize import average_bits, default_grid
from aquakv.weights.rtn import rtn_bits_per_weight, rtn_quantize_model

log = logging.getLogger(__name__)


@torch.no_grad()
def windows_perplexity(model: nn.Module, windows: torch.Tensor, *, desc: str, progress: bool = True
                       ) -> PerplexityResult:
    """Perplexity over windows [K, T], one forward each: evaluate_perplexity(step=None)'s number, with a progress
    bar or periodic lines while it runs."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    total = 0.0
    for w in progress_bar(windows, desc=desc, enabled=progress, unit="window"):
        total += float(window_nll(model, w[None].to(device)).sum())
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / n_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_tokens, n_windows=windows.shape[0],
                            seconds=time.perf_counter() - t0)


def compare_weights(model: nn.Module, settings: WeightSettings, plan: WeightPlan, eval_ids: torch.Tensor,
                    quantized: Callable[..., nn.Module], *, progress: bool = True
                    ) -> tuple[list[tuple[str, PerplexityResult]], dict[str, nn.Module]]:
    """The table's rows [(name, PerplexityResult with bits_per_value and predicted_ppl)] and the HIGGS models built
    for it ({"uniform": ..., "dp": ...}, so the one to save is not quantized twice). quantized(**plan): a quantized
    copy of `model`."""
    targets = plan.targets
    windows = torch.stack(cut_windows(eval_ids, settings.eval_window, keep_tail=False,
                                      max_windows=settings.eval_windows))
    rtn_bits = int(math.floor(targets.uniform_bits))
    grid = default_grid(targets.uniform_bits)
    names = ["unquantized (fp32)", f"RTN {rtn_bits}-bit", f"HIGGS {targets.uniform_bits:g}-bit d{grid[0]}_n{grid[1]}"]
    if plan.allocation is not None:
        names.append(f"HIGGS + DP (budget {targets.budget:g})")
    log.info("evaluating %d models (%s) on %d windows of %d tokens: %d forwards", len(names), ", ".join(names),
             len(windows), settings.eval_window, len(names) * len(windows))
    rows: list[tuple[str, PerplexityResult]] = []

    def measure(name: str, m: nn.Module, bits_per_weight: float, dnll: float | None) -> None:
        res = windows_perplexity(m, windows, desc=name, progress=progress)
        base = rows[0][1].ppl if rows else res.ppl
        rows.append((name, dataclasses.replace(res, bits_per_value=bits_per_weight,
                                               predicted_ppl=None if dnll is None else base * math.exp(dnll))))
        log.info("%s: ppl %.4f (nll %.5f, %d windows, %d tokens, %.0f s)", name, res.ppl, res.nll, res.n_windows,
                 res.n_tokens, res.seconds)

    measure(names[0], model, 32.0, None)
    rtn = rtn_quantize_model(copy.deepcopy(model), rtn_bits, settings.group_size, settings.include_lm_head,
                             progress=progress)
    measure(names[1], rtn, rtn_bits_per_weight(rtn_bits, settings.group_size), None)
    del rtn
    built = {"uniform": quantized(**plan.grid_plan(uniform=True))}
    table = plan.table
    dnll = (predicted_delta_nll(table, plan.sensitivities.for_layers(table.names), table.uniform_choice(grid))
            if table is not None and grid in table.grids else None)
    measure(names[2], built["uniform"], average_bits(built["uniform"]), dnll)
    if plan.allocation is not None:
        built["dp"] = quantized(**plan.grid_plan(uniform=False))
        measure(names[3], built["dp"], average_bits(built["dp"]), plan.allocation.predicted_delta_nll)
    return rows, built
