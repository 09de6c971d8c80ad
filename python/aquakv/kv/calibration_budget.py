"""Calibration at a bit budget (`aquakv.calibrate(..., budget=2.3)`): the widths per layer and per K/V are chosen by
the linearity theorem before the predictors are fitted with them in the loop (docs/method.md).

1. A reference pass fits the predictors at the uniform `bits` and measures, per layer and part, the held-out relative
   error of the residual under every candidate grid (aquakv.kv.fit.SequentialFit with candidates).
2. The sensitivities alpha^K_l, alpha^V_l are measured on a few calibration windows (aquakv.kv.sensitivities).
3. The dynamic programme picks the widths (aquakv.kv.bit_allocation); the caller then fits again with them.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from aquakv.grids import bits_per_value_choices
from aquakv.kv.bit_allocation import KVBitAllocation, allocate_kv_bits, candidate_quantizers
from aquakv.kv.capture import iter_layer_states
from aquakv.kv.fit import SequentialFit
from aquakv.kv.predictor_settings import AquaKVSettings, with_widths
from aquakv.kv.sensitivities import KVSensitivities, measure_kv_sensitivities
from aquakv.progress import progress as progress_bar  # `progress` is the argument that turns it on

log = logging.getLogger(__name__)


def sensitivity_windows(windows: list[torch.Tensor], count: int) -> torch.Tensor:
    """[count', T] the first `count` windows of the full length T (the fit windows come first; a short tail window
    cannot be stacked)."""
    if count < 1:
        raise ValueError(f"calibrate: sensitivity_windows must be >= 1, got {count}")
    length = max(w.numel() for w in windows)
    full = [w for w in windows if w.numel() == length][:count]
    return torch.stack(full)


def choose_widths(model, windows: list[torch.Tensor], settings: AquaKVSettings, n_fit: int, *, budget: float,
                  fit_args: dict, sinks: int, offload: bool, exact: Sequence[int], info: dict,
                  candidate_bits: Sequence[float] | None = None, n_sensitivity_windows: int = 4,
                  noise: float = 0.01, progress: bool = True
                  ) -> tuple[AquaKVSettings, KVBitAllocation, KVSensitivities]:
    """The settings with per-layer widths at `budget` bits/value, the allocation and the sensitivities measured.
    fit_args: SequentialFit's rank, damping, device, store, structure, groups (as `calibrate` builds them)."""
    bits = bits_per_value_choices(settings.grid_dim) if candidate_bits is None else candidate_bits
    candidates = candidate_quantizers(settings, bits)
    fit = SequentialFit(n_fit, settings, candidates=candidates, **fit_args)
    with progress_bar(total=info["num_layers"], desc="aquakv: reference pass (errors per grid)", unit="layer",
                      enabled=progress) as bar:
        for layer, keys, values in iter_layer_states(model, windows, sinks, offload=offload, progress=bar):
            fit.add_layer(keys, values, exact=layer in exact)
    sens = measure_kv_sensitivities(model, sensitivity_windows(windows, n_sensitivity_windows), noise=noise,
                                    sinks=sinks, seed=settings.seed, exact_layers=exact, progress=progress)
    allocation = allocate_kv_bits(fit.candidate_errors, sens, settings, candidates, info["num_layers"],
                                  info["kv_width"], budget)
    log.info("KV widths at %.3f bits/value: %s", budget, allocation.histogram())
    return with_widths(settings, allocation.key_bits, allocation.value_bits), allocation, sens


def record_allocation(preds, allocation: KVBitAllocation, sens: KVSensitivities) -> None:
    """What the allocation measured, kept in the predictors file: per layer the sensitivities and widths in the
    report, the budget and prediction in the calibration record."""
    for entry in preds.report:
        layer = entry["layer"]
        entry.update({"key_alpha": sens.keys[layer], "value_alpha": sens.values[layer],
                      "key_bits": allocation.key_bits[layer], "value_bits": allocation.value_bits[layer]})
    preds.calibration.update({"budget": allocation.budget, "predicted_delta_nll": allocation.predicted_delta_nll,
                              "sensitivity_windows": sens.windows, "sensitivity_noise": sens.noise,
                              "sensitivity_seconds": round(sens.seconds, 1)})
