"""HIGGS weight quantization end to end, as a library call: what `aquakv quantize-weights` runs.

    report = quantize_weights(model, tokenizer, budget=3.0625, out=Path("q3"), evaluate=True)
    report.rows    # [(name, PerplexityResult)]: unquantized, RTN, HIGGS uniform, HIGGS + DP

Three steps, each usable alone: plan_weights (aquakv.weights.plan: the settings' checks, and the layer errors,
sensitivities and allocation when the DP runs), compare_weights (aquakv.weights.compare: the evaluation table),
and quantize_and_save (here). Order of work, cheapest check first: options; the output directory (writable, not
created yet); the budget against the layers' sizes (no quantization needed); then the measurements, the
evaluation rows, and the files, each written atomically. The output directory is created only when the first
file is written, and removed again if it is still empty when a step fails.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from aquakv.atomic_writes import write_json_atomic
from aquakv.evaluation.result import PerplexityResult
from aquakv.weights.allocate import Allocation
from aquakv.weights.compare import compare_weights
from aquakv.weights.checkpoint import METADATA_FILE, TENSORS_FILE, save_quantized
from aquakv.weights.plan import (
    WeightPlan,
    WeightSettings,
    bundled_ids,
    check_output_dir,
    check_run_options,
    check_weight_options,
    plan_weights,
    shipped_widths,
)
from aquakv.weights.quantize import average_bits, quantize_model
from aquakv.weights.sensitivities import Sensitivities

__all__ = ["WeightSettings", "WeightsReport", "check_output_dir", "check_run_options", "check_weight_options",
           "quantize_and_save", "quantize_weights", "shipped_widths"]


@dataclass
class WeightsReport:
    """What `quantize_weights` did. rows: (name, PerplexityResult) per evaluated model, bits_per_value holding its
    bits per weight (scales included) and predicted_ppl the linearity theorem's prediction where there is one."""

    rows: list[tuple[str, PerplexityResult]]
    allocation: Allocation | None
    sensitivities: Sensitivities | None
    average_bits: float  # of the saved model, over its quantized linears
    uniform_bits: float
    budget: float | None  # the DP's average bits (None: the DP did not run)
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


def quantize_and_save(model: nn.Module, settings: WeightSettings, plan: WeightPlan, directory: str | os.PathLike,
                      *, quantized: nn.Module | None = None, progress: bool = True) -> nn.Module:
    """Quantize a copy of `model` as planned (the DP's allocation with budget=, else the uniform width) unless
    `quantized` is that copy already, and write it (plus allocation.json when the DP ran) to `directory`
    atomically. Returns the quantized model."""
    directory = Path(directory)
    target = quantized or _quantized(model, settings, progress)(**plan.grid_plan(uniform=settings.budget is None))
    directory.mkdir(parents=True, exist_ok=True)
    save_quantized(target, directory)
    if plan.allocation is not None:
        _write_allocation(directory / "allocation.json", plan)
    return target


def _quantized(model: nn.Module, settings: WeightSettings, progress: bool):
    def build(**grids) -> nn.Module:  # a quantized copy: the unquantized model stays available for other rows
        return quantize_model(copy.deepcopy(model), group_size=settings.group_size, seed=settings.seed,
                              include_lm_head=settings.include_lm_head, progress=progress, **grids)
    return build


def _write_allocation(path: Path, plan: WeightPlan) -> None:
    allocation = plan.allocation
    write_json_atomic(path, dict(budget_bits=plan.targets.budget, average_bits=allocation.average_bits,
                                 predicted_delta_nll=allocation.predicted_delta_nll, histogram=allocation.histogram(),
                                 grid_per_layer=allocation.grid_per_layer))


@torch.no_grad()
def quantize_weights(model: nn.Module, tokenizer, settings: WeightSettings | None = None, *,
                     out: str | os.PathLike, calib_ids: torch.Tensor | None = None,
                     eval_ids: torch.Tensor | None = None, progress: bool = True, **options) -> WeightsReport:
    """Plan, compare (settings.evaluate) and quantize-and-save `model`'s linear layers into `out` (the model itself
    is not modified). settings: a WeightSettings, or its fields as keyword arguments (bits=, budget=, evaluate=,
    ...). calib_ids: the sensitivities' text (default the bundled calibration text); eval_ids: the table's (default
    the bundled evaluation text). Writes out/higgs_weights.safetensors + higgs_weights.json, out/sensitivities.json
    when measured, out/allocation.json when the DP ran, and out/results.json with the table."""
    known = {f.name for f in fields(WeightSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"quantize_weights: unknown option {unknown[0]!r} (the WeightSettings fields: {sorted(known)})")
    if settings is not None and options:
        raise TypeError("quantize_weights: give settings= or its fields as keyword arguments, not both")
    settings = settings or WeightSettings(**options)
    settings.check()
    output = _Output(check_output_dir(out))
    results: dict = {"model": settings.label, "group_size": settings.group_size, "seed": settings.seed, "rows": []}
    with output.guard():
        plan = plan_weights(model, tokenizer, settings, calib_ids=calib_ids, progress=progress,
                            save_sensitivities=lambda s: s.save(output.path("sensitivities.json")))
        if "layer_errors" in plan.seconds:
            results["layer_errors_seconds"] = plan.seconds["layer_errors"]
        if plan.sensitivities is not None:
            sens = plan.sensitivities
            results["sensitivities"] = dict(noise=sens.noise, windows=sens.windows, window_len=sens.window_len,
                                            seconds=sens.seconds, method=sens.method)
        rows: list[tuple[str, PerplexityResult]] = []
        built: dict[str, nn.Module] = {}
        if settings.evaluate:
            ids = eval_ids if eval_ids is not None else bundled_ids(tokenizer, "evaluation")
            rows, built = compare_weights(model, settings, plan, ids, _quantized(model, settings, progress),
                                          progress=progress)
        output.path(TENSORS_FILE)
        output.path(METADATA_FILE)
        if plan.allocation is not None:
            output.path("allocation.json")
            results["allocation"] = plan.allocation.histogram()
        target = quantize_and_save(model, settings, plan, output.directory, progress=progress,
                                   quantized=built.get("uniform" if settings.budget is None else "dp"))
        for name, res in rows:
            row = dict(method=name, bits_per_weight=res.bits_per_value, perplexity=res.ppl, nll=res.nll,
                       seconds=res.seconds)
            if res.predicted_ppl is not None:
                row["predicted_perplexity"] = res.predicted_ppl
            results["rows"].append(row)
        if settings.evaluate:
            write_json_atomic(output.path("results.json"), results)
    return WeightsReport(rows, plan.allocation, plan.sensitivities, average_bits(target), plan.targets.uniform_bits,
                         plan.targets.budget if settings.needs_dp else None, output.paths, results)
