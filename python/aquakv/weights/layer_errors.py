"""Per-layer HIGGS errors and sizes: the e_ij and costs the bit allocation (aquakv.weights.allocate) chooses from.

    table = measure_layer_errors(model)     # every quantizable linear x every candidate grid: e_ij, bits
    names, numel, cost = layer_costs(model, grids)   # sizes only, no quantization: what a budget is checked against
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from aquakv.progress import progress as progress_bar
from aquakv.weights.linear import DEFAULT_GROUP_SIZE, higgs_quantize_dequantize_weight, higgs_weight_cost
from aquakv.weights.quantize import Grid, candidate_grids, quantizable_linears

@dataclass
class LayerTable:
    """errors[i, j]: relative MSE of layer i under grid j; cost_bits[i, j]: its storage (codes + scales)."""

    names: list[str]
    numel: np.ndarray  # int64 [L]
    grids: list[Grid]  # [J]
    group_size: int
    errors: np.ndarray  # float64 [L, J]
    cost_bits: np.ndarray  # int64 [L, J]

    def uniform_choice(self, grid: Grid) -> np.ndarray:
        return np.full(len(self.names), self.grids.index(tuple(grid)))

    def average_bits(self, choice: Sequence[int]) -> float:
        return float(self.cost_bits[np.arange(len(self.names)), choice].sum() / self.numel.sum())


def layer_costs(model: nn.Module, grids: Sequence[Grid], *, group_size: int = DEFAULT_GROUP_SIZE,
                include_lm_head: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names [L], numel int64 [L], cost_bits int64 [L, J]) of every quantizable linear under every grid: what the
    budget is checked against. Needs only the layers' sizes, no quantization."""
    layers = quantizable_linears(model, include_lm_head)
    if not layers:
        raise ValueError("the model has no nn.Linear layer to quantize")
    numel = np.array([m.weight.numel() for m in layers.values()], dtype=np.int64)
    # Costs in HiggsLinear's row-aligned layout: a 576-wide layer stores groups of 64, so 4 scale bits more per
    # 256 weights than whole groups of 256 would suggest.
    cost = np.array([[higgs_weight_cost(m.weight.numel(), dim, points, group_size, in_features=m.in_features)
                      for dim, points in grids] for m in layers.values()],
                    dtype=np.int64).reshape(len(layers), len(grids))
    return list(layers), numel, cost


@torch.no_grad()
def measure_layer_errors(model: nn.Module, grids: Sequence[Grid] | None = None, *, group_size: int = DEFAULT_GROUP_SIZE,
                         seed: int = 0, include_lm_head: bool = False, progress: bool = True) -> LayerTable:
    """Quantize every quantizable linear with every candidate grid (default `candidate_grids()`) and record
    the relative error and the size. The model is not modified."""
    grids = [tuple(g) for g in (grids if grids is not None else candidate_grids())]
    layers = quantizable_linears(model, include_lm_head)
    if not layers:
        raise ValueError("measure_layer_errors: the model has no nn.Linear layer to quantize")
    errors = np.zeros((len(layers), len(grids)))
    cost = np.zeros((len(layers), len(grids)), dtype=np.int64)
    numel = np.array([m.weight.numel() for m in layers.values()], dtype=np.int64)
    bar = progress_bar(total=len(layers) * len(grids), desc="layer errors", enabled=progress, unit="quant")
    for i, linear in enumerate(layers.values()):
        w = linear.weight.detach().float()
        energy = float(w.double().pow(2).sum())
        for j, (dim, n) in enumerate(grids):
            w_hat = higgs_quantize_dequantize_weight(w, dim=dim, n_points=n, group_size=group_size, seed=seed)
            errors[i, j] = float((w - w_hat).double().pow(2).sum()) / max(energy, 1e-300)
            cost[i, j] = higgs_weight_cost(w.numel(), dim, n, group_size, in_features=linear.in_features)
            bar.update()
    bar.close()
    return LayerTable(list(layers), numel, grids, group_size, errors, cost)
