"""Data-free HIGGS quantization of a model's linear layers, and saving/loading the result."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from aquakv.grids import available_grids, grid_info
from aquakv.weights.linear import DEFAULT_GROUP_SIZE, HiggsLinear, grid_bits

log = logging.getLogger(__name__)

Grid = tuple[int, int]  # (dim, n_points)

FORMAT = "aquakv-higgs-weights"
FORMAT_VERSION = 1
TENSORS_FILE = "higgs_weights.safetensors"
METADATA_FILE = "higgs_weights.json"


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
    return min(matches, key=lambda g: (_grid_mse(g), g[1]))


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

    bits: the same code bits per value everywhere, grid `default_grid(bits)` (or (dim, 2**(bits*dim)) when dim
        is given).
    grid_per_layer: {layer name: (dim, n_points)} per layer, e.g. from `allocate_bits`; a name mapped to None,
        or a quantizable layer not listed, stays in full precision. Exactly one of bits / grid_per_layer.
    Embeddings are never quantized; the output head only with include_lm_head (a head tied to the input
    embedding is then untied: the embedding keeps its full-precision weight).
    """
    if (bits is None) == (grid_per_layer is None):
        raise ValueError("quantize_model: give exactly one of bits= or grid_per_layer=")
    layers = quantizable_linears(model, include_lm_head)
    if grid_per_layer is None:
        grid = default_grid(bits) if dim is None else (dim, 1 << round(bits * dim))
        plan: dict[str, Grid | None] = {name: grid for name in layers}
    else:
        unknown = sorted(set(grid_per_layer) - set(layers))
        if unknown:
            raise ValueError(f"quantize_model: grid_per_layer names layers that are not quantizable linears of this "
                             f"model (include_lm_head={include_lm_head}): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        plan = {name: grid_per_layer.get(name) for name in layers}
        kept = sum(g is None for g in plan.values())
        if kept:
            log.info("quantize_model: %d of %d linear layers stay in full precision (not in grid_per_layer)", kept, len(plan))
    for name, grid in tqdm(plan.items(), desc="HIGGS quantize", disable=not progress, unit="layer"):
        if grid is None:
            continue
        new = HiggsLinear.from_linear(layers[name], dim=grid[0], n_points=grid[1], group_size=group_size, seed=seed,
                                      cache_weight=cache_weight)
        _set_submodule(model, name, new)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
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


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write every HiggsLinear of the model to `directory`: codes, scales and biases in
    higgs_weights.safetensors, and per-layer settings (grid, group size, seed, shape, dtype) in
    higgs_weights.json. Other weights are not written: load_quantized applies the file to a fresh copy
    of the same base model. Returns the directory."""
    from safetensors.torch import save_file

    import aquakv

    layers = higgs_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no HiggsLinear layer (run quantize_model first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {}
    for name, m in layers.items():
        tensors[f"{name}.codes"] = m.codes.detach().cpu().contiguous()
        tensors[f"{name}.scales"] = m.scales.detach().cpu().contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().cpu().contiguous()
        meta[name] = dict(dim=m.dim, n_points=m.n_points, group_size=m.group_size, seed=m.seed,
                          in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None,
                          dtype=str(m.compute_dtype).removeprefix("torch."))
    save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": FORMAT})
    header = dict(format=FORMAT, format_version=FORMAT_VERSION, library_version=aquakv.__version__,
                  average_bits=average_bits(model), layers=meta)
    (directory / METADATA_FILE).write_text(json.dumps(header, indent=1))
    return directory


@torch.no_grad()
def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Replace the layers listed in `directory` (written by save_quantized) by HiggsLinear, in place, with the
    stored codes bit-exact. The model must be the same architecture as the saved one; each layer's
    shape is checked. Returns the model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, tensor_path = directory / METADATA_FILE, directory / TENSORS_FILE
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"load_quantized: {path} not found (expected the output of save_quantized)")
    header = json.loads(meta_path.read_text())
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_quantized: {meta_path} is not a {FORMAT} v{FORMAT_VERSION} file "
                         f"(format={header.get('format')!r}, version={header.get('format_version')!r})")
    tensors = load_file(str(tensor_path))
    modules = dict(model.named_modules())
    for name, cfg in header["layers"].items():
        old = modules.get(name)
        if not isinstance(old, (nn.Linear, HiggsLinear)):
            raise ValueError(f"load_quantized: layer {name!r} from {meta_path} is not a linear layer of this model")
        if (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise ValueError(f"load_quantized: layer {name!r} is [{old.out_features}, {old.in_features}] in the model "
                             f"but [{cfg['out_features']}, {cfg['in_features']}] in {meta_path}")
        device = old.codes.device if isinstance(old, HiggsLinear) else old.weight.device
        new = HiggsLinear(cfg["in_features"], cfg["out_features"], dim=cfg["dim"], n_points=cfg["n_points"],
                          group_size=cfg["group_size"], seed=cfg["seed"], bias=cfg["bias"],
                          dtype=getattr(torch, cfg["dtype"]), device=device)
        for key in ("codes", "scales") + (("bias",) if cfg["bias"] else ()):
            stored = tensors[f"{name}.{key}"]
            target = getattr(new, key)
            if stored.shape != target.shape or stored.dtype != target.dtype:
                raise ValueError(f"load_quantized: {name}.{key} is {tuple(stored.shape)} {stored.dtype} in {tensor_path}, "
                                 f"expected {tuple(target.shape)} {target.dtype}")
            target.data.copy_(stored)
        _set_submodule(model, name, new)
    return model
