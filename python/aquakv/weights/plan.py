"""Planning a HIGGS weight quantization: the settings, their checks, and what must be measured before quantizing.

    settings = WeightSettings(budget=3.0625)               # or bits=4; every option of quantize-weights
    targets = settings.check()                             # cheap: refuses bad widths / budgets before a model load
    plan = plan_weights(model, tokenizer, settings)        # the layer errors, sensitivities and allocation it needs

The slow measurements run only when the result needs them: the DP allocation (budget=, or bits= with
dp_row=True for the comparison row) needs every layer's error under every candidate grid (seconds) and the
layers' sensitivities (minutes: noise injected into each layer alone; reused from a file with sensitivities=).
A fixed width without the DP row needs neither.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from aquakv.evaluation.windows import cut_windows
from aquakv.grids import available_grids, bits_per_value_choices
from aquakv.weights.allocate import Allocation, InfeasibleBudget, allocate_bits, check_budget
from aquakv.weights.layer_errors import LayerTable, layer_costs, measure_layer_errors
from aquakv.weights.linear import grid_bits
from aquakv.weights.quantize import Grid, candidate_grids, default_grid
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


@dataclass(frozen=True)
class WeightSettings:
    """Every option of a weight quantization (quantize-weights' flags). Exactly one of bits (a shipped grid width
    everywhere) and budget (average bits per weight, scales included, for the DP allocation over the candidate
    widths in [min_bits, max_bits]). sensitivities: a measurement or its file to reuse; otherwise measured on
    calib_windows windows of calib_len tokens with relative noise `noise`. evaluate: the comparison table on
    eval_windows windows of eval_window tokens (unquantized, RTN, HIGGS uniform, and HIGGS + DP when the DP runs);
    dp_row: with bits=, also run the DP at bits + 16/group_size for its row (measures the sensitivities unless
    given). label: results.json's "model" entry."""

    bits: float | None = None
    budget: float | None = None
    group_size: int = 256
    seed: int = 0
    include_lm_head: bool = False
    min_bits: float = 2.0
    max_bits: float = 8.0
    sensitivities: Sensitivities | str | os.PathLike | None = None
    noise: float = 0.01
    calib_windows: int = 4
    calib_len: int = 128
    evaluate: bool = False
    eval_window: int = 1024
    eval_windows: int | None = None
    dp_row: bool = False
    label: str | None = None

    def check(self) -> WeightTargets:
        """Validate every option without a model (ValueError naming it; an unreachable budget: InfeasibleBudget)."""
        targets = check_weight_options(bits=self.bits, budget=self.budget, group_size=self.group_size,
                                       min_bits=self.min_bits, max_bits=self.max_bits)
        check_run_options(noise=self.noise, calib_windows=self.calib_windows, calib_len=self.calib_len,
                          eval_window=self.eval_window, eval_windows=self.eval_windows)
        return targets

    @property
    def needs_dp(self) -> bool:
        """Whether the DP allocation runs: for the saved model (budget=) or for the comparison row."""
        return self.budget is not None or (self.evaluate and self.dp_row)


@dataclass
class WeightPlan:
    """What planning measured and chose. table/sensitivities/allocation: None when the DP does not run."""

    targets: WeightTargets
    table: LayerTable | None = None
    sensitivities: Sensitivities | None = None
    allocation: Allocation | None = None
    seconds: dict = field(default_factory=dict)  # phase -> wall seconds

    def grid_plan(self, uniform: bool) -> dict:
        """quantize_model's keyword arguments for the uniform model or the DP's."""
        return dict(bits=self.targets.uniform_bits) if uniform else dict(grid_per_layer=self.allocation.grid_per_layer)


def bundled_ids(tokenizer, split: str) -> torch.Tensor:
    """The bundled text of `split` ("calibration" or "evaluation") as token ids."""
    from aquakv.data import default_texts, tokenize

    return tokenize(tokenizer, default_texts(split))


def plan_weights(model: nn.Module, tokenizer, settings: WeightSettings, *, calib_ids: torch.Tensor | None = None,
                 save_sensitivities: Callable[[Sensitivities], None] | None = None,
                 progress: bool = True) -> WeightPlan:
    """Check the settings against the model (the budget needs only the layers' sizes, so it is refused before
    any measurement), then measure what the DP needs, if it runs: the layer errors, the sensitivities (given, or
    measured on calib_ids, default the bundled calibration text, and handed to save_sensitivities), and the
    allocation."""
    targets = settings.check()
    plan = WeightPlan(targets)
    if not settings.needs_dp:
        return plan
    given = settings.sensitivities
    if isinstance(given, (str, os.PathLike)):
        given = Sensitivities.load(given)
    names, numel, cost = layer_costs(model, targets.grids, group_size=settings.group_size,
                                     include_lm_head=settings.include_lm_head)
    check_budget(numel, cost, targets.budget, targets.grids)
    if given is not None:
        given.for_layers(names)
    log.info("the DP allocation at %g bits/weight: layer errors for %d layers x %d candidate grids %s (shipped: %s)%s",
             targets.budget, len(names), len(targets.grids), targets.grids, available_grids(),
             "" if given is not None else f", then the sensitivities: noise in each layer alone on "
             f"{settings.calib_windows} windows of {settings.calib_len} tokens (a few forwards per layer; about 10 "
             f"minutes for SmolLM2-135M on one thread)")
    t0 = time.perf_counter()
    plan.table = measure_layer_errors(model, targets.grids, group_size=settings.group_size, seed=settings.seed,
                                      include_lm_head=settings.include_lm_head, progress=progress)
    plan.seconds["layer_errors"] = time.perf_counter() - t0
    sens = given
    if sens is None:
        ids = calib_ids if calib_ids is not None else bundled_ids(tokenizer, "calibration")
        calib = torch.stack(cut_windows(ids, settings.calib_len, keep_tail=False, max_windows=settings.calib_windows))
        sens = measure_sensitivities(model, calib, noise=settings.noise, seed=settings.seed,
                                     include_lm_head=settings.include_lm_head, progress=progress)
        if save_sensitivities is not None:
            save_sensitivities(sens)
        log.info("sensitivities: %d layers in %.0f s (%s)", len(sens.names), sens.seconds, sens.method)
    plan.sensitivities = sens
    plan.allocation = allocate_bits(plan.table, sens, targets.budget)
    return plan
