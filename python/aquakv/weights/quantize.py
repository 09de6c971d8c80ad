"""Data-free HIGGS quantization of a model's linear layers (saving/loading the result: aquakv.weights.checkpoint)."""
from __future__ import annotations

import logging
import math
import numbers
from typing import Mapping

import torch
from torch import nn

from aquakv.grids import available_grids, grid_info
from aquakv.progress import progress as progress_bar
from aquakv.quantizer import GridSpec
from aquakv.weights.linear import DEFAULT_GROUP_SIZE, HiggsLinear, grid_bits

log = logging.getLogger(__name__)

Grid = GridSpec  # (dim, n_points); a NamedTuple, so plain (dim, n) tuples compare equal


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """The model's nn.Linear layers by qualified name, in module order. Embeddings are never included
    (they are nn.Embedding); the output head (`get_output_embeddings()`, else a module named `lm_head`)
    only with include_lm_head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        is_head = module is head or name.rsplit(".", 1)[-1] == "lm_head"
        if is_head and not include_lm_head:
            continue
        layers[name] = module
    return layers


def _grid_mse(grid: Grid) -> float:
    try:
        return float(grid_info(*grid).get("mse", math.inf))
    except (KeyError, ValueError):
        return math.inf


def default_grid(bits: float) -> Grid:
    """The shipped grid with log2(n)/d == bits and the lowest MSE on N(0, I) (ties: the smaller n, faster)."""
    matches = [g for g in available_grids() if abs(grid_bits(*g) - bits) < 1e-9]
    if not matches:
        shipped = sorted({grid_bits(*g) for g in available_grids()})
        raise ValueError(f"no shipped grid gives bits={bits} per value; available bit widths: {shipped} "
                         f"(grids (dim, n): {available_grids()})")
    return GridSpec(*min(matches, key=lambda g: (_grid_mse(g), g[1])))


def candidate_grids(min_bits: float = 2.0, max_bits: float = 8.0) -> list[Grid]:
    """One grid per shipped bit width in [min_bits, max_bits] (the best by MSE), sorted by bits.

    The default floor of 2 bits keeps the allocation where its linear error model holds: 1-bit grids lose
    ~36% of a layer's energy, far outside the range where sensitivities were measured."""
    widths = sorted({grid_bits(*g) for g in available_grids() if min_bits - 1e-9 <= grid_bits(*g) <= max_bits + 1e-9})
    if not widths:
        raise ValueError(f"no shipped grid between {min_bits} and {max_bits} bits; available: {available_grids()}")
    return [default_grid(b) for b in widths]


@torch.no_grad()
def quantize_model(model: nn.Module, bits: float | None = None, *, grid_per_layer: Mapping[str, Grid | None] | None = None,
                   dim: int | None = None, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0,
                   include_lm_head: bool = False, cache_weight: bool = False, progress: bool = True) -> nn.Module:
    """Replace the model's linear layers by HiggsLinear, in place (data-free). Returns the model.

    bits: the same bits per value everywhere, grid `default_grid(bits)` (or (dim, 2**(bits*dim)) when dim
        is given).
    grid_per_layer: {layer name: (dim, n_points)} per layer, e.g. from `allocate_bits`; a name mapped to None,
        or a quantizable layer not listed, stays in full precision. Exactly one of bits / grid_per_layer.
    Embeddings are never quantized; the output head only with include_lm_head (a head tied to the input
    embedding is then untied: the embedding keeps its full-precision weight).
    """
    if (bits is None) == (grid_per_layer is None):
        raise ValueError("quantize_model: give exactly one of bits= or grid_per_layer=")
    already = sorted(higgs_layers(model))
    if already:
        raise ValueError(f"quantize_model: the model already has {len(already)} HiggsLinear layers (e.g. {already[0]!r}); "
                         f"quantize a fresh copy of the full-precision model instead")
    layers = quantizable_linears(model, include_lm_head)
    if grid_per_layer is None:
        grid = default_grid(bits) if dim is None else GridSpec(dim, 1 << round(bits * dim))
        plan: dict[str, Grid | None] = {name: grid for name in layers}
    else:
        unknown = sorted(set(grid_per_layer) - set(layers))
        if unknown:
            raise ValueError(f"quantize_model: grid_per_layer names layers that are not quantizable linears of this "
                             f"model (include_lm_head={include_lm_head}): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        plan = {name: _as_grid(name, grid_per_layer.get(name)) for name in layers}
        kept = sum(g is None for g in plan.values())
        if kept:
            log.info("quantize_model: %d of %d linear layers stay in full precision (not in grid_per_layer)", kept, len(plan))
    # All or nothing: every new layer is built before the first one replaces its linear.
    new = {}
    for name, grid in progress_bar(plan.items(), desc="HIGGS quantize", enabled=progress, unit="layer"):
        if grid is not None:
            new[name] = HiggsLinear.from_linear(layers[name], dim=grid.dim, n_points=grid.n, group_size=group_size,
                                                seed=seed, cache_weight=cache_weight)
    for name, module in new.items():
        set_submodule(model, name, module)
    return model


def _as_grid(name: str, grid) -> GridSpec | None:
    if grid is None:
        return None
    try:
        dim, n = grid
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (dim, n)):
            return GridSpec(int(dim), int(n))
    except (TypeError, ValueError):
        pass
    raise ValueError(f"quantize_model: grid_per_layer[{name!r}] must be a (dim, n_points) pair or None, "
                     f"got {grid!r}")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) of `model` with `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def higgs_layers(model: nn.Module) -> dict[str, HiggsLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HiggsLinear)}


def average_bits(model: nn.Module) -> float:
    """Bits per weight over the HiggsLinear layers (codes + scales; biases excluded)."""
    layers = higgs_layers(model).values()
    numel = sum(m.in_features * m.out_features for m in layers)
    if not numel:
        raise ValueError("average_bits: the model has no HiggsLinear layer")
    return sum(m.weight_bits for m in layers) / numel
