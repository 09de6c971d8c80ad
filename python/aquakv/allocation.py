"""The exact dynamic programme behind every bit allocation by the linearity theorem (docs/method.md).

Weights (aquakv.weights.allocate) and the KV cache (aquakv.kv.bit_allocation) both model the loss increase of a
choice as a sum over items (layers, or a layer's keys and values) of a per-item, per-option loss, and pick one option
per item under a total cost: a multiple-choice knapsack. It lives here, importing nothing of aquakv, so both can use
it without importing each other (docs/layout.md).
"""
from __future__ import annotations

import numpy as np


class InfeasibleBudget(ValueError):
    """The requested bit budget cannot be met (or cannot be spent) with the candidate grids."""


def solve_allocation(loss: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """Exact multiple-choice knapsack: one option j per row i minimising sum_i loss[i, j] subject to
    sum_i cost[i, j] <= budget. loss: [L, J] float, cost: [L, J] non-negative ints, budget: int.

    Returns int64 [L] of chosen columns (on equal loss, the lower column). O(L * J * range) time with
    range = budget - sum_i min_j cost[i, j], capped at the most that could ever be spent.
    Raises InfeasibleBudget when the budget is below the cheapest choice, or above the most expensive one.
    """
    loss = np.asarray(loss, dtype=np.float64)
    cost = np.asarray(cost)
    if loss.ndim != 2 or loss.shape != cost.shape or loss.size == 0:
        raise ValueError(f"solve_allocation: loss and cost must be non-empty [L, J] arrays of the same shape, "
                         f"got {loss.shape} and {cost.shape}")
    if not np.issubdtype(cost.dtype, np.integer) or (cost < 0).any():
        raise ValueError("solve_allocation: cost must hold non-negative integers")
    if not np.isfinite(loss).all():
        raise ValueError("solve_allocation: loss has NaN or infinite entries")
    cost = cost.astype(np.int64)
    cheapest, dearest = int(cost.min(1).sum()), int(cost.max(1).sum())
    if budget < cheapest:
        raise InfeasibleBudget(f"budget {budget} is below the cheapest configuration ({cheapest}: every layer at its smallest option)")
    if budget > dearest:
        raise InfeasibleBudget(f"budget {budget} is above the most expensive configuration ({dearest}: every layer at its "
                               f"largest option); it cannot be spent")
    extra = cost - cost.min(1, keepdims=True)
    cap = budget - cheapest
    rows, options = loss.shape
    best = np.zeros(cap + 1)  # best[b]: least loss of the rows so far with extra cost <= b
    pick = np.zeros((rows, cap + 1), dtype=np.int16 if options < 2 ** 15 else np.int64)
    for i in range(rows):
        new = np.full(cap + 1, np.inf)
        for j in range(options):
            c = int(extra[i, j])
            if c > cap:
                continue
            candidate = best[: cap + 1 - c] + loss[i, j]
            better = candidate < new[c:]
            new[c:][better] = candidate[better]
            pick[i, c:][better] = j
        best = new
    choice = np.zeros(rows, dtype=np.int64)
    b = cap
    for i in range(rows - 1, -1, -1):
        choice[i] = pick[i, b]
        b -= int(extra[i, choice[i]])
    return choice
