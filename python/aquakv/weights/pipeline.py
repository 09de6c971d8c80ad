"""HIGGS weight quantization end to end, as a library call: what `aquakv quantize-weights` runs.

    targets = check_weight_options(budget=3.0625)      # cheap: refuses bad widths / budgets before any model load
    report = quantize_weights(model, tokenizer, budget=3.0625, out=Path("q3"), evaluate=True)
    report.rows    # [(name, PerplexityResult)]: unquantized, RTN, HIGGS uniform, HIGGS + DP

Order of work, cheapest check first: options; the output directory (writable, not created yet); the budget against
the layers' sizes (no quantization needed); then the per-layer errors, the sensitivities (measured, or read from
a file), the allocation, the evaluation rows, and the files, each written atomically. The output directory is
created only when the first file is written, and removed again if it is still empty when a step fails.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from aquakv.evaluation.perplexity import PerplexityResult, evaluate_perplexity
from aquakv.evaluation.windows import cut_windows
from aquakv.atomic_writes import write_json_atomic
from aquakv.grids import available_grids, bits_per_value_choices
from aquakv.weights.allocate import (
    Allocation,
    InfeasibleBudget,
    allocate_bits,
    check_budget,
    layer_costs,
    measure_layer_errors,
    predicted_delta_nll,
)
from aquakv.weights.files import METADATA_FILE, TENSORS_FILE, save_quantized
from aquakv.weights.linear import grid_bits
from aquakv.weights.quantize import (
    Grid,
    average_bits,
    candidate_grids,
    default_grid,
    quantize_model,
)
from aquakv.weights.rtn import rtn_bits_per_weight, rtn_quantize_model
from aquakv.weights.sensitivities import Sensitivities, measure_sensitivities

log = logging.getLogger(__name__)

SCALE_BITS = 16  # one fp16 scale per group


def shipped_widths() -> list[float]:
    """Code bits per weight of the shipped grids (log2(n) / d), sorted: the widths `bits=` accepts."""
    return bits_per_value_choices()


@dataclass(frozen=True)
class WeightTargets:
    """What the options ask for. uniform_bits: code bits of the uniform HIGGS model (with budget=: the largest
    width that fits it); budget: average bits per weight including scales for the DP (with bits=: bits + 16/G);
    grids: the DP's candidate grids."""

    uniform_bits: float
    budget: float
    grids: list[Grid]


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_weight_options(*, bits: float | None = None, budget: float | None = None, group_size: int = 256,
                         min_bits: float = 2.0, max_bits: float = 8.0) -> WeightTargets:
    """Validate the quantization options without a model (raises ValueError naming the option; an unreachable
    budget raises InfeasibleBudget). Exactly one of bits (a shipped grid width) and budget (average bits per weight,
    scales included)."""
    if (bits is None) == (budget is None):
        raise ValueError("give exactly one of bits= (uniform width) or budget= (average bits for the DP allocation)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 \
            or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 2, got {group_size!r}")
    min_bits, max_bits = _finite("min_bits", min_bits), _finite("max_bits", max_bits)
    if min_bits > max_bits:
        raise ValueError(f"min_bits ({min_bits:g}) must not exceed max_bits ({max_bits:g})")
    try:
        grids = candidate_grids(min_bits, max_bits)
    except ValueError:
        raise ValueError(f"no shipped grid width lies in [min_bits, max_bits] = [{min_bits:g}, {max_bits:g}]; "
                         f"shipped widths: {', '.join(f'{w:g}' for w in shipped_widths())}") from None
    overhead = SCALE_BITS / group_size
    if bits is not None:
        bits = _finite("bits", bits)
        if not any(abs(bits - w) < 1e-9 for w in shipped_widths()):
            raise ValueError(f"bits={bits:g} is not a shipped HIGGS grid width; choose one of "
                             f"{', '.join(f'{w:g}' for w in shipped_widths())}")
        uniform, target = bits, bits + overhead
        grids_in_use = grids + [default_grid(bits)]
    else:
        target = _finite("budget", budget)
        widths = [grid_bits(*g) for g in grids]
        fitting = [w for w in widths if w + overhead <= target + 1e-9]
        if not fitting:
            raise InfeasibleBudget(f"budget={target:g} is below the cheapest configuration, {min(widths) + overhead:.4f} "
                                   f"bits/weight ({min(widths):g}-bit codes + {SCALE_BITS}/{group_size} for the scales; "
                                   f"min_bits={min_bits:g})")
        uniform = max(fitting)
        grids_in_use = grids
    for dim, n in grids_in_use:
        if group_size % dim:
            raise ValueError(f"group_size {group_size} is not a multiple of the dimension of grid ({dim}, {n})")
    return WeightTargets(uniform, target, grids)


def check_output_dir(out: str | os.PathLike) -> Path:
    """The output directory, if it exists or could be created and written to (nothing is created here)."""
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"out={out}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"out={out}: directory {probe} is not writable")
    return out


@dataclass
class WeightsReport:
    """What `quantize_weights` did. rows: (name, PerplexityResult) per evaluated model, bits_per_value holding its
    bits per weight (scales included) and predicted_ppl the linearity theorem's prediction where there is one."""

    rows: list[tuple[str, PerplexityResult]]
    allocation: Allocation | None
    sensitivities: Sensitivities | None
    average_bits: float  # of the saved model, over its quantized linears
    uniform_bits: float
    budget: float | None  # the DP's average bits (None: bits= and no evaluation, no DP run)
    paths: list[Path] = field(default_factory=list)
    results: dict = field(default_factory=dict)  # the content of results.json


class _Output:
    """Creates the output directory on the first write; on failure removes it again while still empty."""

    def __init__(self, directory: Path):
        self.directory, self.created, self.paths = directory, False, []

    def path(self, name: str) -> Path:
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self.created = True
        self.paths.append(self.directory / name)
        return self.paths[-1]

    @contextlib.contextmanager
    def guard(self) -> Iterator["_Output"]:
        try:
            yield self
        except BaseException:
            if self.created and self.directory.is_dir() and not any(self.directory.iterdir()):
                self.directory.rmdir()
            raise


def check_run_options(*, noise: float = 0.01, calib_windows: int = 4, calib_len: int = 128, eval_window: int = 1024,
                      eval_windows: int | None = None) -> None:
    """Validate the measurement and evaluation options (ValueError naming the option)."""
    if not 0 < _finite("noise", noise) < 1:
        raise ValueError(f"noise (relative MSE t^2) must be in (0, 1), got {noise}")
    for name, value, low in (("calib_windows", calib_windows, 1), ("calib_len", calib_len, 2),
                             ("eval_window", eval_window, 2), ("eval_windows", eval_windows, 1)):
        if value is None and name == "eval_windows":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _bundled_ids(tokenizer, split: str) -> torch.Tensor:
    from aquakv.data import default_texts, tokenize

    return tokenize(tokenizer, default_texts(split))


@torch.no_grad()
def quantize_weights(model: nn.Module, tokenizer, *, bits: float | None = None, budget: float | None = None,
                     out: str | os.PathLike, group_size: int = 256, seed: int = 0, include_lm_head: bool = False,
                     min_bits: float = 2.0, max_bits: float = 8.0,
                     sensitivities: Sensitivities | str | os.PathLike | None = None, noise: float = 0.01,
                     calib_windows: int = 4, calib_len: int = 128, evaluate: bool = False, eval_window: int = 1024,
                     eval_windows: int | None = None, calib_ids: torch.Tensor | None = None,
                     eval_ids: torch.Tensor | None = None, label: str | None = None,
                     progress: bool = True) -> WeightsReport:
    """Quantize `model`'s linear layers with HIGGS and write them to `out` (the model itself is not modified).

    bits: one shipped grid width everywhere; budget: average bits per weight (scales included) for the DP
    allocation over the candidate widths in [min_bits, max_bits]. The DP runs with budget=, and with evaluate=True
    also for bits= (at bits + 16/group_size) to give the comparison row. sensitivities: a measurement or its file
    to reuse; otherwise measured on calib_windows windows of calib_len tokens (calib_ids, default the bundled
    calibration text) and written to out/sensitivities.json. evaluate: perplexity (one forward per window of
    eval_window tokens, at most eval_windows) on eval_ids (default the bundled evaluation text) of: unquantized, RTN
    at the uniform width, HIGGS uniform, HIGGS + DP; written to out/results.json (label: its "model" entry).
    Writes out/higgs_weights.safetensors + higgs_weights.json (and allocation.json when the DP ran).
    """
    targets = check_weight_options(bits=bits, budget=budget, group_size=group_size, min_bits=min_bits,
                                   max_bits=max_bits)
    check_run_options(noise=noise, calib_windows=calib_windows, calib_len=calib_len, eval_window=eval_window,
                      eval_windows=eval_windows)
    output = _Output(check_output_dir(out))
    given = Sensitivities.load(sensitivities) if isinstance(sensitivities, (str, os.PathLike)) else sensitivities
    need_dp = budget is not None or evaluate
    results: dict = {"model": label, "group_size": group_size, "seed": seed, "rows": []}
    if need_dp:  # the budget depends on the layers' sizes only: refuse it before any measurement
        names, numel, cost = layer_costs(model, targets.grids, group_size=group_size, include_lm_head=include_lm_head)
        check_budget(numel, cost, targets.budget, targets.grids)
        if given is not None:
            given.for_layers(names)
    with output.guard():
        table = sens = allocation = None
        if need_dp:
            log.info("candidate grids (dim, n): %s (shipped: %s)", targets.grids, available_grids())
            t0 = time.perf_counter()
            table = measure_layer_errors(model, targets.grids, group_size=group_size, seed=seed,
                                         include_lm_head=include_lm_head, progress=progress)
            results["layer_errors_seconds"] = time.perf_counter() - t0
            sens = given
            if sens is None:
                ids = calib_ids if calib_ids is not None else _bundled_ids(tokenizer, "calibration")
                calib = torch.stack(cut_windows(ids, calib_len, keep_tail=False, max_windows=calib_windows))
                sens = measure_sensitivities(model, calib, noise=noise, seed=seed, include_lm_head=include_lm_head,
                                             progress=progress)
                sens.save(output.path("sensitivities.json"))
                log.info("sensitivities: %d layers in %.0f s (%s)", len(sens.names), sens.seconds, sens.method)
            results["sensitivities"] = dict(noise=sens.noise, windows=sens.windows, window_len=sens.window_len,
                                            seconds=sens.seconds, method=sens.method)
            allocation = allocate_bits(table, sens, targets.budget)

        def higgs(**plan) -> nn.Module:  # a quantized copy: the unquantized model stays available for other rows
            return quantize_model(copy.deepcopy(model), group_size=group_size, seed=seed,
                                  include_lm_head=include_lm_head, progress=progress, **plan)

        rows: list[tuple[str, PerplexityResult]] = []
        uniform_model = dp_model = None
        if evaluate:
            ids = eval_ids if eval_ids is not None else _bundled_ids(tokenizer, "evaluation")

            def measure(name: str, m: nn.Module, bits_per_weight: float, dnll: float | None) -> None:
                res = evaluate_perplexity(m, ids, window=eval_window, step=None, max_windows=eval_windows,
                                          progress=progress, desc=name)
                base = rows[0][1].ppl if rows else res.ppl
                rows.append((name, dataclasses.replace(res, bits_per_value=bits_per_weight,
                                                       predicted_ppl=None if dnll is None else base * math.exp(dnll))))
                log.info("%s: ppl %.4f (nll %.5f, %d windows, %d tokens, %.0f s)", name, res.ppl, res.nll,
                         res.n_windows, res.n_tokens, res.seconds)

            measure("unquantized (fp32)", model, 32.0, None)
            rtn_bits = int(math.floor(targets.uniform_bits))
            rtn = rtn_quantize_model(copy.deepcopy(model), rtn_bits, group_size, include_lm_head, progress=progress)
            measure(f"RTN {rtn_bits}-bit", rtn, rtn_bits_per_weight(rtn_bits, group_size), None)
            del rtn
            grid = default_grid(targets.uniform_bits)
            uniform_model = higgs(bits=targets.uniform_bits)
            measure(f"HIGGS {targets.uniform_bits:g}-bit d{grid[0]}_n{grid[1]}", uniform_model,
                    average_bits(uniform_model),
                    predicted_delta_nll(table, sens.for_layers(table.names), table.uniform_choice(grid))
                    if grid in table.grids else None)
            dp_model = higgs(grid_per_layer=allocation.grid_per_layer)
            measure(f"HIGGS + DP (budget {targets.budget:g})", dp_model, average_bits(dp_model),
                    allocation.predicted_delta_nll)

        if budget is not None:
            target = dp_model or higgs(grid_per_layer=allocation.grid_per_layer)
        else:
            target = uniform_model or higgs(bits=targets.uniform_bits)
        output.path(TENSORS_FILE)
        output.path(METADATA_FILE)
        save_quantized(target, output.directory)
        if allocation is not None:
            write_json_atomic(output.path("allocation.json"), dict(
                budget_bits=targets.budget, average_bits=allocation.average_bits,
                predicted_delta_nll=allocation.predicted_delta_nll, histogram=allocation.histogram(),
                grid_per_layer=allocation.grid_per_layer))
            results["allocation"] = allocation.histogram()
        for name, res in rows:
            row = dict(method=name, bits_per_weight=res.bits_per_value, perplexity=res.ppl, nll=res.nll,
                       seconds=res.seconds)
            if res.predicted_ppl is not None:
                row["predicted_perplexity"] = res.predicted_ppl
            results["rows"].append(row)
        if evaluate:
            write_json_atomic(output.path("results.json"), results)
    return WeightsReport(rows, allocation, sens, average_bits(target), targets.uniform_bits,
                         targets.budget if need_dp else None, output.paths, results)
