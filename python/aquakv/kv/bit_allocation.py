"""KV bit widths per layer and per K/V by the linearity theorem (docs/method.md).

The NLL increase of coding layer l's keys with grid j is modelled as alpha^K_l * e^K_lj (values likewise), with
  e_lj    the held-out relative reconstruction MSE of that part's AQUA-KV residual under grid j
          (aquakv.kv.fit.SequentialFit with candidates), and
  alpha_l the part's measured sensitivity (aquakv.kv.sensitivities).
The exact dynamic programme of aquakv.allocation then picks one grid per predicted layer and part minimising the
sum, under an average bits/value over every compressed value: codes + scales of keys and values of every compressed
layer, the chain start (layer 0, kept at layer0_bits, or fp16) included. That is `AquaKVPredictors.bits_per_value()`,
the "compressed part" `aquakv calibrate` prints.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

from aquakv.allocation import InfeasibleBudget, solve_allocation
from aquakv.kv.predictor_settings import PARTS, AquaKVSettings
from aquakv.kv.predictors import part_bits_per_value
from aquakv.kv.sensitivities import KVSensitivities
from aquakv.quantizer import HiggsQuantizer

log = logging.getLogger(__name__)


@dataclass
class KVBitAllocation:
    """The widths chosen and what the linear model predicts for them."""

    key_bits: list[float | None]  # per layer; None at the chain start and at exact layers
    value_bits: list[float | None]
    average_bits: float  # achieved: codes + scales per compressed value (AquaKVPredictors.bits_per_value)
    budget: float  # requested
    predicted_delta_nll: float  # sum over parts of max(alpha, 0) * e at the chosen grids, nats per token

    def histogram(self) -> dict[str, int]:
        """How many layer parts got each width, e.g. {'keys 2 bits': 20, 'values 3 bits': 9, ...}."""
        counts: dict[str, int] = {}
        for part, widths in (("keys", self.key_bits), ("values", self.value_bits)):
            for b in sorted({b for b in widths if b is not None}):
                counts[f"{part} {b:g} bits"] = sum(w == b for w in widths)
        return counts


def candidate_quantizers(settings: AquaKVSettings, candidate_bits: Sequence[float]) -> list[HiggsQuantizer]:
    """One HIGGS quantizer per candidate width, the settings' grid dimension, group and seed (ValueError naming a
    width without a shipped grid)."""
    if not candidate_bits:
        raise ValueError("bit allocation: no candidate widths")
    return [HiggsQuantizer(bits=b, dim=settings.grid_dim, group_size=settings.group_size, seed=settings.seed)
            for b in sorted(set(candidate_bits))]


def _cost_units(q: HiggsQuantizer | None, width: int, group_size: int, grid_dim: int) -> int:
    """A part's bits per value x C x G x d: an exact integer for codes + scales (+ padding) and for fp16."""
    return round(part_bits_per_value(q, width) * width * group_size * grid_dim)


def allocate_kv_bits(candidate_errors: list[dict], sensitivities: KVSensitivities, settings: AquaKVSettings,
                     candidates: Sequence[HiggsQuantizer], num_layers: int, width: int, budget: float
                     ) -> KVBitAllocation:
    """Choose per-layer key and value widths minimising sum alpha * e at average bits/value <= budget.

    candidate_errors: per compressed layer {"layer", "chain_start", "keys": [e_j], "values": [e_j]}, e_j under
    candidates[j] (SequentialFit.candidate_errors). Chain-start layers keep settings.layer0_bits and are counted at
    that cost. Negative sensitivities (noise on insensitive parts) count as 0. InfeasibleBudget when the budget is
    below every part at the smallest candidate, or above every part at the largest."""
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"bit allocation: budget must be a finite positive bits/value, got {budget!r}")
    g, d = settings.group_size, settings.grid_dim
    start_q = settings.quantizer_for(True)
    fixed, rows, loss, layers = 0, [], [], []
    for entry in candidate_errors:
        if entry["chain_start"]:
            fixed += 2 * _cost_units(start_q, width, g, d)
            continue
        for part in PARTS:
            alpha = getattr(sensitivities, part)[entry["layer"]]
            errors = np.asarray(entry[part], dtype=np.float64)
            if not math.isfinite(alpha) or not np.isfinite(errors).all() or len(errors) != len(candidates):
                raise ValueError(f"bit allocation: layer {entry['layer']} {part}: sensitivity {alpha!r} or errors "
                                 f"{errors.tolist()} are not finite (or not one per candidate)")
            loss.append(max(alpha, 0.0) * errors)
            layers.append((entry["layer"], part))
    if not layers:
        raise ValueError("bit allocation: no predicted layer to allocate (every compressed layer is a chain start)")
    costs = np.array([[_cost_units(q, width, g, d) for q in candidates]] * len(layers), dtype=np.int64)
    n_parts = 2 * len(candidate_errors)
    total = math.floor(budget * width * g * d * n_parts + 1e-6)
    low, high = (fixed + costs.min(1).sum()) / (width * g * d * n_parts), (fixed + costs.max(1).sum()) / (width * g * d * n_parts)
    if total < fixed + costs.min(1).sum():
        raise InfeasibleBudget(f"budget {budget:g} bits/value is below the cheapest allocation, {low:.4f} (every "
                               f"predicted part at {candidates[0].settings.bits:g} bits, the chain start at its own)")
    if total > fixed + costs.max(1).sum():
        raise InfeasibleBudget(f"budget {budget:g} bits/value is above the dearest allocation, {high:.4f} (every "
                               f"predicted part at {candidates[-1].settings.bits:g} bits); lower it")
    unit = reduce(math.gcd, costs.ravel().tolist())
    choice = solve_allocation(np.stack(loss), costs // unit, (total - fixed) // unit)
    widths = {p: [None] * num_layers for p in PARTS}
    for (layer, part), j in zip(layers, choice):
        widths[part][layer] = candidates[j].settings.bits
    spent = fixed + int(costs[np.arange(len(layers)), choice].sum())
    delta = float(sum(row[j] for row, j in zip(loss, choice)))
    log.info("KV bit allocation at %.4f bits/value: %.4f spent, predicted NLL increase %.5f", budget,
             spent / (width * g * d * n_parts), delta)
    return KVBitAllocation(widths["keys"], widths["values"], spent / (width * g * d * n_parts), budget, delta)
