"""Calibration of AQUA-KV predictors (docs/method.md): capture pre-RoPE keys and values on calibration text one layer
at a time (aquakv.kv.capture) and fit that layer's affine predictors in closed form, in layer order, with quantization
in the loop.

    preds = aquakv.calibrate(model, token_ids_or_texts, bits=2, tokenizer=tok, window=1024, max_windows=64)
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from typing import Sequence

import torch

from aquakv.evaluation.windows import cut_windows
from aquakv.kv.calibration_budget import choose_widths, record_allocation
from aquakv.kv.capture import iter_layer_states
from aquakv.kv.fit import SequentialFit, structure_groups
from aquakv.kv.predictor_settings import AquaKVSettings, parse_layer0_bits
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.kv.support import check_supported
from aquakv.kv.local_layers import exact_local_layers
from aquakv.progress import progress as progress_bar  # `progress` is the argument that turns it on

log = logging.getLogger(__name__)


def make_windows(data, tokenizer=None, window: int = 1024, max_windows: int | None = None,
                 min_tokens: int = 1) -> list[torch.Tensor]:
    """Calibration windows: 1-D LongTensors of at most `window` tokens.

    data: a list of 1-D LongTensors (each cut into consecutive windows; a shorter tail is kept as its own window),
          a single 1-D LongTensor, or a list of strings with `tokenizer` (concatenated with EOS, then cut).
    max_windows: keep this many windows spread evenly over all of them (deterministic), not just the first ones.
    min_tokens: drop windows with fewer tokens.
    """
    from aquakv.data import tokenize

    if isinstance(data, torch.Tensor):
        data = [data]
    if isinstance(data, str) or not isinstance(data, Sequence) or len(data) == 0:
        raise TypeError("data must be a non-empty list of 1-D LongTensors of token ids, or of strings with tokenizer=")
    if all(isinstance(d, str) for d in data):
        if tokenizer is None:
            raise ValueError("data is a list of strings: pass tokenizer= to turn them into token ids")
        data = [tokenize(tokenizer, data)]
    return cut_windows(data, window, keep_tail=True, min_tokens=min_tokens, max_windows=max_windows, spread=True)


def _split(windows: list[torch.Tensor], sinks: int, held_out: float) -> tuple[int, int]:
    """(fit rows, held-out rows) of the captured rows: the last `held_out` share of windows is held out (of a
    single window: its last share of rows)."""
    counts = [max(w.numel() - sinks, 0) for w in windows]
    total = sum(counts)
    if len(windows) >= 2:
        n_hold = min(max(1, round(held_out * len(windows))), len(windows) - 1)
        held = sum(counts[-n_hold:])
    else:
        held = int(total * held_out)
    if total - held < 2 or held < 1:
        raise ValueError(f"calibration has {total} usable tokens (after {sinks} sink tokens per window): too few to "
                         f"fit and hold out; pass more or longer windows")
    return total - held, held


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_options(*, bits, layer0_bits, damping, sinks, held_out) -> None:
    """Refuse option values the fit would silently misuse (a negative ridge, a negative sink count, holding out
    every window) or fail on deep inside (non-finite bits), naming the argument."""
    for name, value in (("bits", bits), ("layer0_bits", layer0_bits)):
        if name == "layer0_bits" and isinstance(value, str):
            continue  # "fp16" (anything else is refused with the settings)
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"calibrate: {name} must be a finite positive number, got {value!r}")
    if not _is_real(damping) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"calibrate: damping must be a finite number >= 0, got {damping!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, numbers.Integral) or sinks < 0:
        raise ValueError(f"calibrate: sinks must be an integer >= 0, got {sinks!r}")
    if not _is_real(held_out) or not 0 <= held_out < 1:
        raise ValueError(f"calibrate: held_out must be a share in [0, 1), got {held_out!r}")


@torch.no_grad()
def calibrate(model, data, bits: float = 2, *, tokenizer=None, window: int = 1024, max_windows: int | None = None,
              rank: int | None = None, structure: str = "full", group_size: int | None = None, grid_dim: int = 2,
              layer0_bits: float | str = 4, seed: int = 0, device: str | torch.device | None = None,
              offload: bool = True, damping: float = 1e-3, sinks: int = 4, held_out: float = 0.1,
              budget: float | None = None, candidate_bits: Sequence[float] | None = None,
              sensitivity_windows: int = 4, progress: bool = True) -> AquaKVPredictors:
    """Fit AQUA-KV predictors for `model` on calibration data.

    data: 1-D LongTensors of token ids (any length, cut into windows of `window` tokens) or strings + tokenizer=.
    bits: code bits per value for layers >= 1 (HIGGS grid (grid_dim, 2**(bits*grid_dim)), group_size = head_dim
      by default). layer0_bits: bits of layer 0's centered quantizer, or "fp16" to keep layer 0 exact.
      A hybrid model's local layers are kept exact by the cache and not fitted (aquakv.kv.local_layers); its first
      compressed layer takes layer 0's part.
    rank: reduced-rank predictors (two factors of rank r) instead of dense C x C / 2C x C maps.
    structure: "full" (dense maps, the default) or "per-head": block-diagonal maps, KV head g of a layer predicted
      from head g of its inputs alone (a third of the weights and FLOPs on 3 heads; heads stay independent, as
      tensor parallelism shards them); with rank, rank r per head (docs/predictor_structures.md).
    damping: ridge damping relative to the mean diagonal of the centered X^T X. sinks: leading tokens of each window
      left out (the cache keeps them exact). held_out: share of windows held out for the per-layer report.
    device: where the fit runs (default: the model's device). The model runs one decoder layer at a time over all
      windows (aquakv.kv.capture), so memory holds the hidden states entering one layer plus that layer's states and
      the previous layer's reconstructions, for all calibration tokens, whatever the depth of the model.
      offload=True keeps those on the CPU and streams them through `device`; offload=False keeps them on the
      devices (faster on a GPU with room to spare).
    budget: average bits/value of the compressed part (codes + scales of keys and values of every compressed layer,
      layer 0 included: `AquaKVPredictors.bits_per_value()`); the widths of every predicted layer's keys and values
      are then chosen by the linearity theorem among candidate_bits (default: every shipped grid of grid_dim) and the
      predictors fitted with them (aquakv.kv.calibration_budget; `bits` is the reference pass's width). Costs a
      second pass and 4 * layers replays of `sensitivity_windows` windows.
    Deterministic for fixed inputs and settings. The report (predictors.report) holds per layer the held-out
    relative MSE of the predictions, of the final reconstruction, and of HIGGS alone at the same bits.
    """
    t0 = time.perf_counter()
    _check_options(bits=bits, layer0_bits=layer0_bits, damping=damping, sinks=sinks, held_out=held_out)
    check_supported(model, who="aquakv.calibrate", probe=True)
    info = AquaKVPredictors.model_info_of(model)
    settings = AquaKVSettings(bits=bits, grid_dim=grid_dim, seed=seed, layer0_bits=parse_layer0_bits(layer0_bits),
                              group_size=group_size or AquaKVPredictors.default_group_size(info["head_dim"]))
    settings.quantizer_for(True), settings.quantizer_for(False)  # validates bits/grid/group before the slow part
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 or None, got {rank}")
    groups = structure_groups(structure, info["num_kv_heads"])  # refuses an unknown structure, naming it
    windows = make_windows(data, tokenizer, window, max_windows, min_tokens=sinks + 1)
    n_fit, _ = _split(windows, sinks, held_out)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    exact = exact_local_layers(model.config)  # a hybrid model's local layers: kept exact, not fitted
    fit_args = dict(rank=rank, damping=damping, device=device, store=torch.device("cpu") if offload else device,
                    structure=structure, groups=groups)
    allocation = None
    if budget is not None:
        settings, allocation, sens = choose_widths(
            model, windows, settings, n_fit, budget=budget, fit_args=fit_args, sinks=sinks, offload=offload,
            exact=exact, info=info, candidate_bits=candidate_bits, n_sensitivity_windows=sensitivity_windows,
            progress=progress)
    fit = SequentialFit(n_fit, settings, **fit_args)
    with progress_bar(total=info["num_layers"], desc="aquakv: calibrating layers", unit="layer",
                      enabled=progress) as bar:
        for layer, keys, values in iter_layer_states(model, windows, sinks, offload=offload, progress=bar):
            fit.add_layer(keys, values, exact=layer in exact)
    preds = fit.predictors(info)
    if allocation is not None:
        record_allocation(preds, allocation, sens)
    preds.calibration.update({"windows": len(windows), "window": window, "sinks": sinks,
                              "seconds": round(time.perf_counter() - t0, 1)})
    _log_summary(preds)
    return preds


def _log_summary(preds: AquaKVPredictors) -> None:
    def mean(key: str) -> float:  # over predicted layers (those with a source), else over all
        predicted = [r for r in preds.report if preds.sources[r["layer"]] is not None]
        vals = [r[key] for r in predicted] or [r[key] for r in preds.report]
        return sum(vals) / len(vals)

    log.info("calibrated %r on %d tokens (%d held out) in %.1f s", preds, preds.calibration["fit_tokens"],
             preds.calibration["held_out_tokens"], preds.calibration.get("seconds", math.nan))
    log.info("held-out relative MSE, mean over predicted layers: prediction K %.4f V %.4f; reconstruction K %.4f V %.4f "
             "(HIGGS alone: K %.4f V %.4f)", mean("key_pred_rel_mse"), mean("value_pred_rel_mse"),
             mean("key_rel_err"), mean("value_rel_err"), mean("key_higgs_rel_err"), mean("value_higgs_rel_err"))


def format_report(preds: AquaKVPredictors) -> str:
    """The per-layer held-out report as a text table."""
    cols = ["key_pred_rel_mse", "key_rel_err", "key_higgs_rel_err", "value_pred_rel_mse", "value_rel_err",
            "value_higgs_rel_err"]
    lines = ["layer " + " ".join(f"{c:>19}" for c in cols)]
    for r in preds.report:
        lines.append(f"{r['layer']:>5} " + " ".join(f"{r[c]:>19.4f}" if math.isfinite(r[c]) else f"{'nan':>19}"
                                                     for c in cols))
    return "\n".join(lines)
