"""Bit-width allocation for HIGGS weights (docs/weights.md, the "linearity theorem").

For layer i quantized with grid j, the loss increase is modelled as alpha_i * e_ij, where
  e_ij    = ||W_i - Q_j(W_i)||^2 / ||W_i||^2 (relative MSE, measured by quantizing), and
  alpha_i = d NLL / d (relative MSE of layer i), measured once per layer by adding Gaussian noise of a
            known relative size t^2 to that layer alone and watching the calibration NLL.
The model's NLL increase is predicted as sum_i alpha_i e_ij, and an exact dynamic programme picks one
grid per layer minimising it under a total bit budget. The e_ij come from aquakv.weights.layer_errors, the
alphas from aquakv.weights.sensitivities.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

from aquakv.allocation import InfeasibleBudget, solve_allocation  # shared with the KV allocation
from aquakv.weights.layer_errors import LayerTable
from aquakv.weights.linear import grid_bits
from aquakv.weights.quantize import Grid
from aquakv.weights.sensitivities import Sensitivities

log = logging.getLogger(__name__)


def check_budget(numel: np.ndarray, cost_bits: np.ndarray, average_bits: float, grids: Sequence[Grid]) -> None:
    """Raise InfeasibleBudget when `average_bits` per weight (codes + scales) is below the cheapest configuration
    or above the most expensive one (it could not be spent) of layers with these sizes and costs [L, J]."""
    total = int(numel.sum())
    budget_bits = int(math.floor(average_bits * total + 1e-6))
    low, high = cost_bits.min(1).sum() / total, cost_bits.max(1).sum() / total
    if budget_bits < cost_bits.min(1).sum():
        raise InfeasibleBudget(f"average_bits={average_bits} is below the cheapest configuration, {low:.4f} bits/weight "
                               f"(every layer at the smallest candidate grid of {list(grids)})")
    if budget_bits > cost_bits.max(1).sum():
        raise InfeasibleBudget(f"average_bits={average_bits} is above the most expensive configuration, {high:.4f} "
                               f"bits/weight (every layer at the largest candidate grid of {list(grids)}); lower it or "
                               f"add larger grids")


@dataclass
class Allocation:
    """The chosen grid per layer and what the linear model predicts for it."""

    grid_per_layer: dict[str, Grid]
    average_bits: float  # achieved, codes + scales over the quantized weights
    budget_bits: float  # requested average
    predicted_delta_nll: float  # sum_i alpha_i e_ij, nats per token

    def predicted_perplexity(self, base_perplexity: float) -> float:
        return base_perplexity * math.exp(self.predicted_delta_nll)

    def histogram(self) -> dict[str, int]:
        """How many layers got each grid, e.g. {'d2_n64 (3 bits)': 120, ...}."""
        counts: dict[str, int] = {}
        for dim, n in sorted(set(self.grid_per_layer.values()), key=lambda g: grid_bits(*g)):
            key = f"d{dim}_n{n} ({grid_bits(dim, n):g} bits)"
            counts[key] = sum(g == (dim, n) for g in self.grid_per_layer.values())
        return counts


def predicted_delta_nll(table: LayerTable, alpha: np.ndarray, choice: Sequence[int]) -> float:
    """sum_i alpha_i e_{i, choice_i} with negative alphas (measurement noise) counted as 0."""
    alpha = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, None)
    return float((alpha * table.errors[np.arange(len(table.names)), choice]).sum())


def allocate_bits(table: LayerTable, sensitivities: Sensitivities | np.ndarray, average_bits: float,
                  max_steps: int = 2_000_000) -> Allocation:
    """Choose one grid per layer minimising sum_i alpha_i e_ij with average bits per weight (codes + scales)
    <= average_bits. Negative alphas (noise on insensitive layers) are treated as 0.

    Costs are divided by their greatest common divisor, which keeps the programme exact; when that still
    leaves more than max_steps budget steps, costs are rounded up to a coarser unit (never over budget).
    """
    alpha = sensitivities.for_layers(table.names) if isinstance(sensitivities, Sensitivities) else np.asarray(sensitivities, float)
    if alpha.shape != (len(table.names),):
        raise ValueError(f"allocate_bits: {alpha.shape[0]} sensitivities for {len(table.names)} layers")
    negative = int((alpha < 0).sum())
    if negative:
        log.info("allocate_bits: %d layers have a negative measured sensitivity (noise); counted as 0", negative)
    check_budget(table.numel, table.cost_bits, average_bits, table.grids)
    budget_bits = int(math.floor(average_bits * int(table.numel.sum()) + 1e-6))
    unit = reduce(math.gcd, table.cost_bits.ravel().tolist())
    span = (table.cost_bits.max(1) - table.cost_bits.min(1)).sum() // unit
    if span > max_steps:
        unit = int(math.ceil((table.cost_bits.max(1) - table.cost_bits.min(1)).sum() / max_steps))
    cost_units = -(-table.cost_bits // unit)
    budget_units = budget_bits // unit
    loss = np.clip(alpha, 0.0, None)[:, None] * table.errors
    choice = solve_allocation(loss, cost_units, min(budget_units, int(cost_units.max(1).sum())))
    grid_per_layer = {name: table.grids[j] for name, j in zip(table.names, choice)}
    return Allocation(grid_per_layer, table.average_bits(choice), average_bits, predicted_delta_nll(table, alpha, choice))
