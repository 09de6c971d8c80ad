"""Saving and loading HIGGS-quantized weights: two files in one directory, both written atomically.

    higgs_weights.safetensors   {layer}.codes uint8, {layer}.scales float16, {layer}.bias (the layer's dtype)
    higgs_weights.json          {format, format_version, library_version, average_bits, tensors_sha256, layout,
                                 layers: {name: {dim, n_points, group_size, seed, in_features, out_features,
                                                 bias, dtype}}, norms (optional)}

Format v2 (layout "row-aligned"): every group lies inside one row of the weight, the layout HiggsLinear serves
from its codes (weights/linear.py, row_group_size); a layer's group_size is the one it uses. Format v1 cut the
flattened weight into groups, so a group ran onto the next row wherever in_features % group_size != 0. A v1
file loads when none of its layers did that (its bytes are then the v2 layout); otherwise it is refused with
the command that re-quantizes the model.

norms: the names of full-precision parameters stored with the layers, written only for a model that PV-Tuning
trained them in (pv_tune(tune_norms=True) names its RMSNorm weights in `model.aquakv_tuned_norms`); their tensors
are stored under those names, and loading copies them into the model, so tuned norms are never lost on a save.

The JSON names the SHA-256 of the tensors file it was written with, so a directory whose two files come from
different saves (an interrupted save, a copied file) is refused rather than decoded with the wrong settings.
Loading checks every field against the schema and the model, builds every new layer, and only then swaps them
in: a refused file leaves the model untouched. Every refusal is one ValueError that starts with the file's path.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from aquakv.atomic_writes import write_bytes_atomic, write_json_atomic
from aquakv.models import file_sha256
from aquakv.weights.linear import HiggsLinear
from aquakv.weights.quantize import average_bits, higgs_layers, set_submodule

FORMAT = "aquakv-higgs-weights"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LAYOUT = "row-aligned"
TENSORS_FILE = "higgs_weights.safetensors"
METADATA_FILE = "higgs_weights.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
_TOP_REQUIRED = ("format", "format_version", "library_version", "average_bits", "layers")
_V1_FIX = ("re-quantize the model with this version (e.g. `aquakv quantize-weights --bits 4 --out DIR`, the same "
           "--budget / --group-size as before, or save_quantized after quantize_model), which writes format v2")
_LAYER_INTS = ("dim", "n_points", "group_size", "seed", "in_features", "out_features")
_LAYER_KEYS = _LAYER_INTS + ("bias", "dtype")
TUNED_NORMS_ATTR = "aquakv_tuned_norms"  # on a model: names of the parameters save_quantized stores as well


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write every HiggsLinear of the model to `directory` (created if needed): codes, scales and biases in
    higgs_weights.safetensors, per-layer settings in higgs_weights.json, each file atomically. Other weights are
    not written: load_quantized applies the files to a fresh copy of the same base model. Returns the directory."""
    from safetensors.torch import save

    from aquakv.version import version

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
    norms = _tuned_norms(model)
    for name, p in norms.items():
        tensors[name] = p.detach().cpu().contiguous()
    data = save(tensors, metadata={"format": FORMAT})
    header = dict(format=FORMAT, format_version=FORMAT_VERSION, library_version=version(),
                  average_bits=average_bits(model), tensors_sha256=hashlib.sha256(data).hexdigest(), layout=LAYOUT,
                  layers=meta)
    if norms:
        header["norms"] = sorted(norms)
    write_bytes_atomic(directory / TENSORS_FILE, data)  # tensors first: the JSON names their hash
    write_json_atomic(directory / METADATA_FILE, header)
    return directory


@torch.no_grad()
def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Replace the layers listed in `directory` (written by save_quantized) by HiggsLinear, in place, with the
    stored codes bit-exact. The model must be the same architecture as the saved one; every layer's shape is
    checked. All or nothing: on any error the model is left as it was. Returns the model."""
    directory = Path(directory)
    meta_path, tensor_path = directory / METADATA_FILE, directory / TENSORS_FILE
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"load_quantized: {path} not found (expected the output of save_quantized)")
    header = _read_header(meta_path)
    modules = dict(model.named_modules())
    new = {}
    for name, cfg in header["layers"].items():
        new[name] = _empty_layer(meta_path, name, cfg, modules.get(name))
    norms = _stored_norms(meta_path, header, model, set(header["layers"]))
    _fill(tensor_path, header, new, norms)
    for name, module in new.items():
        set_submodule(model, name, module)
    for name, value in norms.items():
        dict(model.named_parameters())[name].copy_(value)
    if norms:
        setattr(model, TUNED_NORMS_ATTR, tuple(sorted(norms)))
    return model


def _tuned_norms(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters named in model.aquakv_tuned_norms (set by pv_tune with tune_norms=True), by name."""
    names = getattr(model, TUNED_NORMS_ATTR, None) or ()
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"save_quantized: the model names {missing[0]!r} among its tuned norms, but has no such "
                         f"parameter")
    return {n: params[n] for n in names}


def _stored_norms(path: Path, header: dict, model: nn.Module, layers: set[str]) -> dict[str, torch.Tensor]:
    """name -> an empty tensor shaped like the model's parameter, for every name in the header's norms, after
    checking that each is a parameter of the model outside the quantized layers."""
    names = header.get("norms", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: norms: must be a list of distinct parameter names, got {names!r}")
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        if name not in params or name.rpartition(".")[0] in layers:
            raise ValueError(f"{path}: norms: {name!r} is not a parameter of this model outside the quantized layers")
        out[name] = torch.empty_like(params[name].detach())
    return out


# ---- the JSON header ----------------------------------------------------------------------------------------------
def _read_header(path: Path) -> dict:
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    try:
        header = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(header).__name__}")
    for key in _TOP_REQUIRED:
        if key not in header:
            raise ValueError(f"{path}: {key}: missing")
    unknown = sorted(set(header) - set(_TOP_REQUIRED) - {"tensors_sha256", "norms", "layout"})
    if unknown:
        raise ValueError(f"{path}: {unknown[0]}: unknown field")
    version = header["format_version"]
    if header["format"] != FORMAT or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format: not a {FORMAT} file of version {' or '.join(map(str, READABLE_VERSIONS))} "
                         f"(format={header['format']!r}, version={version!r})")
    if version >= 2 and header.get("layout") != LAYOUT:
        raise ValueError(f"{path}: layout: must be {LAYOUT!r} in format v{version}, got {header.get('layout')!r}")
    if not isinstance(header["library_version"], str):
        raise ValueError(f"{path}: library_version: must be a string, got {header['library_version']!r}")
    if isinstance(header["average_bits"], bool) or not isinstance(header["average_bits"], (int, float)):
        raise ValueError(f"{path}: average_bits: must be a number, got {header['average_bits']!r}")
    sha = header.get("tensors_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise ValueError(f"{path}: tensors_sha256: must be a hex SHA-256 string, got {sha!r}")
    layers = header["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: layers: must be a non-empty JSON object of layer settings")
    for name, cfg in layers.items():
        _check_layer(path, name, cfg)
        if version == 1 and cfg["in_features"] % cfg["group_size"]:
            raise ValueError(f"{path}: layers[{name!r}]: a format v1 layer whose groups of {cfg['group_size']} run "
                             f"across rows (in_features {cfg['in_features']} is not a multiple), which cannot be "
                             f"served from its codes; {_V1_FIX}")
    return header


def _check_layer(path: Path, name: str, cfg) -> None:
    field = f"layers[{name!r}]"
    if not name or not isinstance(cfg, dict):
        raise ValueError(f"{path}: {field}: must be a non-empty layer name mapped to a JSON object")
    missing = [k for k in _LAYER_KEYS if k not in cfg]
    unknown = sorted(set(cfg) - set(_LAYER_KEYS))
    if missing or unknown:
        problem = f"{missing[0]} missing" if missing else f"unknown field {unknown[0]!r}"
        raise ValueError(f"{path}: {field}: {problem}")
    for key in _LAYER_INTS:
        value = cfg[key]
        low = 0 if key == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 2 ** 63:
            raise ValueError(f"{path}: {field}.{key}: must be an integer >= {low}, got {value!r}")
    if not isinstance(cfg["bias"], bool):
        raise ValueError(f"{path}: {field}.bias: must be true or false, got {cfg['bias']!r}")
    if cfg["dtype"] not in _DTYPES:
        raise ValueError(f"{path}: {field}.dtype: must be one of {sorted(_DTYPES)}, got {cfg['dtype']!r}")
    n = cfg["n_points"]
    if n < 2 or n & (n - 1):
        raise ValueError(f"{path}: {field}.n_points: {n} is not a power of two >= 2")


def _empty_layer(path: Path, name: str, cfg: dict, old: nn.Module | None) -> HiggsLinear:
    """A zero HiggsLinear with the settings of cfg, on old's device, once old proves to be a linear of that shape."""
    if not isinstance(old, (nn.Linear, HiggsLinear)):
        raise ValueError(f"{path}: layer {name!r} is not a linear layer of this model")
    if (old.in_features, old.out_features) != (cfg["in_features"], cfg["out_features"]):
        raise ValueError(f"{path}: layer {name!r} is [{old.out_features}, {old.in_features}] in the model "
                         f"but [{cfg['out_features']}, {cfg['in_features']}] in the file")
    device = old.codes.device if isinstance(old, HiggsLinear) else old.weight.device
    try:
        layer = HiggsLinear(cfg["in_features"], cfg["out_features"], dim=cfg["dim"], n_points=cfg["n_points"],
                            group_size=cfg["group_size"], seed=cfg["seed"], bias=cfg["bias"],
                            dtype=_DTYPES[cfg["dtype"]], device=device)
    except ValueError as e:  # the quantizer's own check of grid, group size and seed
        raise ValueError(f"{path}: layers[{name!r}]: settings refused ({e})") from None
    if layer.group_size != cfg["group_size"]:  # a v2 file names the group size a layer uses
        raise ValueError(f"{path}: layers[{name!r}].group_size: {cfg['group_size']} is not row-aligned for "
                         f"in_features {cfg['in_features']} (this layer would use {layer.group_size}); {_V1_FIX}")
    return layer


# ---- the tensors --------------------------------------------------------------------------------------------------
def _fill(path: Path, header: dict, new: dict[str, HiggsLinear], norms: dict[str, torch.Tensor]) -> None:
    """Copy the stored tensors into the new layers and the norms' tensors, after checking names, dtypes and shapes
    from the header."""
    from safetensors import safe_open

    expected = {f"{name}.{key}": (name, key) for name, m in new.items()
                for key in ("codes", "scales") + (("bias",) if m.bias is not None else ())}
    expected.update({name: (name, None) for name in norms})
    sha = header.get("tensors_sha256")
    if sha is not None and file_sha256(path) != sha:
        raise ValueError(f"{path}: tensors_sha256: the file does not match the hash in {path.with_name(METADATA_FILE)}"
                         f"; the two files come from different saves")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors' own errors on truncated, empty or foreign bytes
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    with f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise ValueError(f"{path}: format: the safetensors metadata does not say {FORMAT!r}")
        names = set(f.keys())
        unknown, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        if unknown or missing:
            which = f"unknown tensor {unknown[0]!r}" if unknown else f"tensor {missing[0]!r} missing"
            raise ValueError(f"{path}: {which} (the tensors must be exactly those of the layers in {METADATA_FILE})")
        for tensor_name, (name, key) in expected.items():
            target = norms[name] if key is None else getattr(new[name], key)
            view = f.get_slice(tensor_name)
            shape, dtype = tuple(view.get_shape()), view.get_dtype()
            if shape != tuple(target.shape) or dtype != _ST_DTYPES[target.dtype]:
                raise ValueError(f"{path}: {tensor_name}: is {list(shape)} {dtype}, expected {list(target.shape)} "
                                 f"{_ST_DTYPES[target.dtype]}")
            stored = f.get_tensor(tensor_name)
            if key != "codes" and not bool(torch.isfinite(stored).all()):
                raise ValueError(f"{path}: {tensor_name}: holds NaN or Inf values")
            if key == "scales" and bool((stored < 0).any()):
                raise ValueError(f"{path}: {tensor_name}: holds negative group norms")
            target.data.copy_(stored)
