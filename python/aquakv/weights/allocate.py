"""Bit-width allocation for HIGGS weights (DESIGN §4, the "linearity theorem").

For layer i quantized with grid j, the loss increase is modelled as alpha_i * e_ij, where
  e_ij    = ||W_i - Q_j(W_i)||^2 / ||W_i||^2 (relative MSE, measured by quantizing), and
  alpha_i = d NLL / d (relative MSE of layer i), measured once per layer by adding Gaussian noise of a
            known relative size t^2 to that layer alone and watching the calibration NLL.
The model's NLL increase is predicted as sum_i alpha_i e_ij, and an exact dynamic programme picks one
grid per layer minimising it under a total bit budget.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import reduce
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from aquakv.evaluation.nll import token_nll
from aquakv.weights.linear import (
    DEFAULT_GROUP_SIZE,
    grid_bits,
    higgs_quantize_dequantize_weight,
    higgs_weight_cost,
)
from aquakv.weights.quantize import Grid, candidate_grids, quantizable_linears

log = logging.getLogger(__name__)


class InfeasibleBudget(ValueError):
    """The requested bit budget cannot be met (or cannot be spent) with the candidate grids."""


# ---------------------------------------------------------------------------------------------------
# Per-layer errors and sizes
# ---------------------------------------------------------------------------------------------------
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
    bar = tqdm(total=len(layers) * len(grids), desc="layer errors", disable=not progress, unit="quant")
    for i, linear in enumerate(layers.values()):
        w = linear.weight.detach().float()
        energy = float(w.double().pow(2).sum())
        for j, (dim, n) in enumerate(grids):
            w_hat = higgs_quantize_dequantize_weight(w, dim=dim, n_points=n, group_size=group_size, seed=seed)
            errors[i, j] = float((w - w_hat).double().pow(2).sum()) / max(energy, 1e-300)
            cost[i, j] = higgs_weight_cost(w.numel(), dim, n, group_size)
            bar.update()
    bar.close()
    return LayerTable(list(layers), numel, grids, group_size, errors, cost)


# ---------------------------------------------------------------------------------------------------
# Sensitivities
# ---------------------------------------------------------------------------------------------------
@dataclass
class Sensitivities:
    """alpha[i]: NLL increase (nats/token) per unit relative MSE of layer i, measured with noise t^2 = noise."""

    names: list[str]
    alpha: list[float]
    base_nll: float  # calibration NLL of the unperturbed model
    noise: float  # t^2, the relative MSE of the injected noise
    antithetic: bool
    windows: int
    window_len: int
    seconds: float
    method: str = "suffix"  # "suffix" (re-run only the blocks after the layer) or "full"
    extra: dict = field(default_factory=dict)  # alpha_stderr: [L] standard error over calibration windows

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivities":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sensitivities file not found: {path}")
        return cls(**json.loads(path.read_text()))

    def for_layers(self, names: Sequence[str]) -> np.ndarray:
        """alpha in the order of `names`; a missing layer raises (the file was measured on another model)."""
        index = dict(zip(self.names, self.alpha))
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"sensitivities: no measurement for {len(missing)} layers, e.g. {missing[:3]} "
                             f"(measured on a different model or with different include_lm_head?)")
        return np.array([index[n] for n in names], dtype=np.float64)


class _SuffixRunner:
    """Computes the calibration NLL re-running only the decoder blocks from a given one onwards.

    A clean pass records each block's inputs (hidden states and the keyword arguments the model passes:
    mask, rotary embeddings, positions); noise in block k leaves blocks < k unchanged, so the NLL
    with noise there needs blocks k.. only: on average half the model. Works for the Llama family
    (model.model.layers, model.model.norm, output head); verified against a full forward on construction,
    falling back to full forwards otherwise.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        self.model, self.device = model, next(model.parameters()).device
        self.batches = windows.to(self.device).split(batch_size)
        inner = getattr(model, "model", None)
        self.blocks = getattr(inner, "layers", None)
        self.norm = getattr(inner, "norm", None)
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.enabled = isinstance(self.blocks, nn.ModuleList) and self.norm is not None and self.head is not None
        self.base_window_nll = self._full_window_nll()
        self.base_nll = float(self.base_window_nll.mean())
        if self.enabled:
            self._capture()
            suffix = self.nll(0)
            if abs(suffix - self.base_nll) > 1e-4 * max(1.0, abs(self.base_nll)):
                log.warning("sensitivities: re-running blocks gives NLL %.6f but the model gives %.6f; "
                            "using full forwards (slower)", suffix, self.base_nll)
                self.enabled = False
                self.inputs = None

    @torch.no_grad()
    def _full_window_nll(self) -> np.ndarray:
        return np.concatenate([_window_nll(self.model(input_ids=batch, use_cache=False).logits, batch)
                               for batch in self.batches])

    @torch.no_grad()
    def _capture(self) -> None:
        self.inputs: list[list[tuple[torch.Tensor, dict]]] = [[] for _ in range(len(self.blocks) + 1)]

        def hook(index):
            def record(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.inputs[index].append((hidden, rest))
            return record

        handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        handles.append(self.norm.register_forward_pre_hook(hook(len(self.blocks)), with_kwargs=True))
        try:
            for batch in self.batches:
                self.model(input_ids=batch, use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def block_of(self, module: nn.Module) -> int:
        """Index of the first block whose output the module changes (len(blocks) for the head)."""
        if self.enabled:
            for i, block in enumerate(self.blocks):
                if any(m is module for m in block.modules()):
                    return i
            if any(m is module for m in self.head.modules()):
                return len(self.blocks)
        return 0

    def nll(self, start: int) -> float:
        """Mean NLL per predicted token (windows have equal length)."""
        return float(self.window_nll(start).mean())

    @torch.no_grad()
    def window_nll(self, start: int) -> np.ndarray:
        """[windows] mean NLL per predicted token of each window, re-running blocks start.."""
        if not self.enabled:
            return self._full_window_nll()
        per_window = []
        for b, batch in enumerate(self.batches):
            hidden = self.inputs[start][b][0]
            for i in range(start, len(self.blocks)):
                out = self.blocks[i](hidden, **self.inputs[i][b][1])
                hidden = out[0] if isinstance(out, tuple) else out
            logits = self.head(self.norm(hidden, **self.inputs[-1][b][1]))
            per_window.append(_window_nll(logits, batch))
        return np.concatenate(per_window)


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """logits [B, T, V], ids [B, T] -> float64 [B] mean next-token NLL of each window."""
    return token_nll(logits[:, :-1], ids[:, 1:]).double().mean(dim=1).cpu().numpy()


@torch.no_grad()
def measure_sensitivities(model: nn.Module, windows: torch.Tensor, *, noise: float = 0.01, antithetic: bool = True,
                          seed: int = 0, include_lm_head: bool = False, layers: Sequence[str] | None = None,
                          batch_size: int = 8, progress: bool = True) -> Sensitivities:
    """alpha_i for every quantizable linear (or the named `layers`).

    windows: [B, T] calibration token ids. noise: t^2, the relative MSE of the Gaussian noise added to one
    layer at a time (its norm is set exactly: ||N||^2 = t^2 ||W||^2). With antithetic=True each layer is
    measured with +N and -N and the two NLLs averaged, which cancels the first-order term g.N (the
    calibration gradient is not zero) and leaves the curvature term the linear model is about.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"measure_sensitivities: windows must be [count, length >= 2] token ids, got {tuple(windows.shape)}")
    if not 0 < noise < 1:
        raise ValueError(f"measure_sensitivities: noise (relative MSE t^2) must be in (0, 1), got {noise}")
    all_layers = quantizable_linears(model, include_lm_head)
    names = list(all_layers) if layers is None else list(layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ValueError(f"measure_sensitivities: not quantizable linears of this model: {unknown[:5]}")
    start_time = time.perf_counter()
    runner = _SuffixRunner(model, windows, batch_size)
    gen = torch.Generator().manual_seed(seed)
    alpha, stderr = [], []
    for name in tqdm(names, desc="sensitivities", disable=not progress, unit="layer"):
        weight = all_layers[name].weight
        original = weight.detach().clone()
        z = torch.randn(weight.shape, generator=gen, dtype=torch.float32).to(weight.device)
        z *= math.sqrt(noise) * original.float().norm() / z.norm()
        start = runner.block_of(all_layers[name])
        signs = (1.0, -1.0) if antithetic else (1.0,)
        nlls = []
        try:
            for sign in signs:
                weight.copy_(original + sign * z.to(weight.dtype))
                nlls.append(runner.window_nll(start))
        finally:
            weight.copy_(original)
        per_window = (sum(nlls) / len(nlls) - runner.base_window_nll) / noise
        alpha.append(float(per_window.mean()))
        stderr.append(float(per_window.std(ddof=1) / math.sqrt(len(per_window))) if len(per_window) > 1 else math.nan)
    return Sensitivities(names, alpha, runner.base_nll, noise, antithetic, windows.shape[0], windows.shape[1],
                         time.perf_counter() - start_time, "suffix" if runner.enabled else "full",
                         extra={"alpha_stderr": stderr})


# ---------------------------------------------------------------------------------------------------
# Dynamic programme
# ---------------------------------------------------------------------------------------------------
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
    total = int(table.numel.sum())
    budget_bits = int(math.floor(average_bits * total + 1e-6))
    low, high = table.cost_bits.min(1).sum() / total, table.cost_bits.max(1).sum() / total
    if budget_bits < table.cost_bits.min(1).sum():
        raise InfeasibleBudget(f"average_bits={average_bits} is below the cheapest configuration, {low:.4f} bits/weight "
                               f"(every layer at the smallest candidate grid of {table.grids})")
    if budget_bits > table.cost_bits.max(1).sum():
        raise InfeasibleBudget(f"average_bits={average_bits} is above the most expensive configuration, {high:.4f} "
                               f"bits/weight (every layer at the largest candidate grid of {table.grids}); lower it or "
                               f"add larger grids")
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
