"""The predictors file: one safetensors file, tensors of the affine maps plus JSON metadata, read against a schema.

Tensors (float32, finite), C = model.kv_width:
    key.0.bias, value.0.bias                    [C]           layer 0: intercept only (the calibrated means)
    key.<l>.bias                                [C]           l >= 1, with either
    key.<l>.weight                              [C, C]          a dense map, or
    key.<l>.down / key.<l>.up                   [C, r] / [r, C] a reduced-rank one (r >= 1)
    value.<l>.*                                 as keys, with 2C inputs ([K^_l ; V^_{l-1}])
  or, block diagonal over G groups of whole KV heads (format_version 2; G >= 2 divides model.num_kv_heads):
    <kind>.<l>.block_weight.<i>                 [G, C/G, C/G]  per input i (keys: i = 0; values: 0 = K^_l, 1 = V^_{l-1})
    <kind>.<l>.block_down.<i> / .block_up       [G, C/G, r] per input / [G, r, C/G]  rank r per group, 1 <= r <= C/G
Either every compressed layer has a key and a value map, or there are no tensors at all (HIGGS-only).
Metadata: the header entry "aquakv" holds JSON {format, format_version, model, settings, report, calibration} and,
for a hybrid model, exact_layers: the local layers the cache keeps exact (format_version 3; they have no tensors, and
the first compressed layer is intercept-only like layer 0). Per-layer widths chosen by the bit allocation are
settings.key_bits and settings.value_bits (format_version 4): one entry per layer, bits where the layer is predicted,
null at the chain start and at exact layers. Files without block-diagonal maps, exact layers or per-layer widths are
written as format_version 1, byte for byte as before those existed; older versions holding any of them are refused.

Loading refuses anything else before it allocates more than the file holds: every failure is one ValueError whose
message starts with the file's path and names the field (a missing file stays a FileNotFoundError).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict

import torch

from aquakv.atomic_writes import save_safetensors_atomic
from aquakv.kv.affine_map import AffineMap
from aquakv.kv.local_layers import chain_sources
from aquakv.kv.predictor_settings import AquaKVSettings, LayerWidthSettings, check_widths

FORMAT = "aquakv-predictors"
FORMAT_VERSION = 4  # 2: block-diagonal (per-head) maps; 3: exact layers; 4: per-layer widths; else written as 1
MAX_LAYERS = 4096  # far beyond any decoder (SmolLM2: 30); bounds what a header may make us allocate
_MAX_INT = 2 ** 31

_TENSOR = re.compile(r"(key|value)\.(0|[1-9][0-9]{0,8})\.(bias|weight|down|up|block_up|block_(?:weight|down)\.[0-9])")
_MODEL_INTS = ("num_layers", "num_kv_heads", "head_dim", "kv_width")
_MODEL_STRS = ("name_or_path", "model_type", "aquakv_version")
_SETTINGS = ("bits", "grid_dim", "group_size", "seed", "layer0_bits")
_WIDTHS = ("key_bits", "value_bits")  # optional settings, format_version 4
_TOP_REQUIRED = ("format", "format_version", "model", "settings")
_TOP_OPTIONAL = ("report", "calibration", "exact_layers")


class _Invalid(ValueError):
    """A schema violation: `field` is where, the message what; load() prefixes the path."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")


# ---- saving -------------------------------------------------------------------------------------------------------
def save_predictors(preds, path: str | os.PathLike) -> None:
    """Write `preds` (an `aquakv.kv.predictors.AquaKVPredictors`) to `path` atomically. Refuses (ValueError)
    predictors the loader would refuse."""
    tensors = {}
    for kind, maps in (("key", preds.key_maps), ("value", preds.value_maps)):
        for layer, m in enumerate(maps):
            if m is not None:
                for name, t in m.tensors().items():
                    tensors[f"{kind}.{layer}.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
    blocks = any(m is not None and m.blocks is not None for m in preds.key_maps + preds.value_maps)
    version = 4 if preds.settings.mixed else 3 if preds.exact_layers else 2 if blocks else 1
    settings = asdict(preds.settings)  # key_bits and value_bits only when the widths are per layer
    meta = {"format": FORMAT, "format_version": version, "model": preds.model_info, "settings": settings,
            "report": preds.report, "calibration": preds.calibration}
    if preds.exact_layers:
        meta["exact_layers"] = list(preds.exact_layers)
    header = json.dumps(meta)
    try:  # the same schema as load: never write a file that cannot be read back
        exact = _check_metadata(json.loads(header))[4]
        _check_tensors({k: (tuple(t.shape), "F32") for k, t in tensors.items()}, preds.model_info,
                       meta["format_version"], exact)
        _check_values(tensors)
    except _Invalid as e:
        raise ValueError(f"AquaKVPredictors.save: refusing to write {os.fspath(path)}: {e}") from None
    save_safetensors_atomic(tensors, path, metadata={"aquakv": header})


# ---- loading ------------------------------------------------------------------------------------------------------
def read_predictors(path: str | os.PathLike) -> dict:
    """Read and validate a predictors file (see the module docstring for the schema) -> the keyword arguments of
    `aquakv.kv.predictors.AquaKVPredictors` (which `AquaKVPredictors.load` builds from them)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a predictors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such predictors file")
    try:
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get("aquakv")
            if header is None:
                raise ValueError(f"{path}: a safetensors file without aquakv metadata (not an AquaKVPredictors file)")
            meta = _parse(header)
            settings, info, report, calibration, exact = _check_metadata(meta)
            specs = {}
            for name in f.keys():
                view = f.get_slice(name)
                specs[name] = (tuple(view.get_shape()), view.get_dtype())
            layout = _check_tensors(specs, info, meta["format_version"], exact)
            tensors = {name: f.get_tensor(name) for name in specs}
        _check_values(tensors)
    except _Invalid as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable predictors file ({type(e).__name__}: {e})") from None
    except Exception as e:  # safetensors' own errors on truncated, empty or foreign bytes
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    maps: dict[str, list[AffineMap | None]] = {"key": [], "value": []}
    for kind in maps:
        for layer in range(info["num_layers"]):
            parts = layout.get((kind, layer))
            maps[kind].append(None if parts is None else
                              AffineMap.from_tensors({p: tensors[f"{kind}.{layer}.{p}"] for p in parts}))
    return dict(key_maps=maps["key"], value_maps=maps["value"], settings=settings, model_info=info, report=report,
                calibration=calibration, exact_layers=exact)


def _parse(header: str):
    try:
        return json.loads(header)
    except (ValueError, RecursionError) as e:
        raise _Invalid("metadata", f"the aquakv header is not valid JSON ({type(e).__name__}: {e})") from None


# ---- the schema ---------------------------------------------------------------------------------------------------
def _check_metadata(meta) -> tuple[AquaKVSettings, dict, list[dict], dict, tuple[int, ...]]:
    _check_keys(meta, "metadata", _TOP_REQUIRED, _TOP_OPTIONAL)
    if meta["format"] != FORMAT:
        raise _Invalid("format", f"is {meta['format']!r}; this library reads {FORMAT!r}")
    version = meta["format_version"]
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise _Invalid("format_version", f"is {version!r}; this library reads versions 1..{FORMAT_VERSION}")
    info = meta["model"]
    _check_keys(info, "model", _MODEL_INTS + _MODEL_STRS, ())
    for key in _MODEL_INTS:
        _check_int(info[key], f"model.{key}", 1, MAX_LAYERS if key == "num_layers" else _MAX_INT)
    for key in _MODEL_STRS:
        if not isinstance(info[key], str):
            raise _Invalid(f"model.{key}", f"must be a string, got {info[key]!r}")
    if info["kv_width"] != info["num_kv_heads"] * info["head_dim"]:
        raise _Invalid("model.kv_width", f"{info['kv_width']} is not num_kv_heads * head_dim = "
                                         f"{info['num_kv_heads']} * {info['head_dim']}")
    settings = _check_settings(meta["settings"], version)
    report = meta.get("report", [])
    if not isinstance(report, list):
        raise _Invalid("report", f"must be a list of per-layer dicts, got {type(report).__name__}")
    for i, entry in enumerate(report):
        _check_flat(entry, f"report[{i}]")
    calibration = meta.get("calibration", {})
    _check_flat(calibration, "calibration")
    exact = meta.get("exact_layers", [])
    if "exact_layers" in meta and version < 3:
        raise _Invalid("exact_layers", f"exact layers need format_version 3, the file says {version}")
    if (not isinstance(exact, list) or not all(_is_int(i) and 0 <= i < info["num_layers"] for i in exact)
            or exact != sorted(set(exact)) or len(exact) >= info["num_layers"]):
        raise _Invalid("exact_layers", f"must be increasing layer indices below model.num_layers = "
                                       f"{info['num_layers']}, leaving at least one layer compressed; got {exact!r}")
    try:  # per-layer widths: one per layer, a shipped grid where the layer is predicted, null elsewhere
        check_widths(settings, chain_sources(info["num_layers"], set(exact)), exact)
    except ValueError as e:
        raise _Invalid(str(e).split(" ", 1)[0].rstrip(":"), str(e).split(" ", 1)[1]) from None
    return settings, info, report, calibration, tuple(exact)


def _check_settings(raw, version: int) -> AquaKVSettings:
    _check_keys(raw, "settings", _SETTINGS, _WIDTHS)
    for key in _WIDTHS:
        if key in raw and version < 4:
            raise _Invalid(f"settings.{key}", f"per-layer widths need format_version 4, the file says {version}")
        if key in raw and not isinstance(raw[key], list):
            raise _Invalid(f"settings.{key}", f"must be a list with one width (or null) per layer, got {raw[key]!r}")
    raw = {k: tuple(v) if k in _WIDTHS else v for k, v in raw.items()}
    for key in ("bits", "layer0_bits"):
        value = raw[key]
        if (value is None and key == "layer0_bits") or _is_number(value):
            continue
        none = " or null (fp16)" if key == "layer0_bits" else ""
        raise _Invalid(f"settings.{key}", f"must be a finite number of bits per value{none}, got {value!r}")
    for key in ("grid_dim", "group_size", "seed"):
        if not _is_int(raw[key]):
            raise _Invalid(f"settings.{key}", f"must be an integer, got {raw[key]!r}")
    settings = (LayerWidthSettings if "key_bits" in raw or "value_bits" in raw else AquaKVSettings)(**raw)
    for start, key in ((False, "bits"), (True, "layer0_bits")):  # the quantizers the cache will build, built now
        try:
            settings.quantizer_for(start)
        except ValueError as e:
            text = str(e)
            field = next((f for f in ("group_size", "seed", "bits") if f in text), "grid_dim")
            raise _Invalid(f"settings.{key if field == 'bits' else field}",
                           f"the quantizer refuses these settings ({text})") from None
    return settings


def _check_tensors(specs: dict[str, tuple[tuple[int, ...], str]], info: dict, version: int, exact=()
                   ) -> dict[tuple[str, int], tuple]:
    """specs: {name: (shape, safetensors dtype)} -> {(kind, layer): the parts present}; {} when there are none.
    exact: layers that must have no tensors."""
    c, n = info["kv_width"], info["num_layers"]
    sources = chain_sources(n, set(exact))
    parts: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
    for name, (shape, dtype) in specs.items():
        match = _TENSOR.fullmatch(name)
        if match is None:
            raise _Invalid(f"tensor {name!r}", "unknown tensor name (expected key|value.<layer>.bias|weight|down|up, "
                                               "or block_weight.<i>|block_down.<i>|block_up)")
        kind, layer, part = match[1], int(match[2]), match[3]
        if layer >= n:
            raise _Invalid(f"tensor {name!r}", f"layer {layer} is beyond model.num_layers = {n}")
        if layer in exact:
            raise _Invalid(f"tensor {name!r}", f"layer {layer} is kept exact (exact_layers) and has no maps")
        if dtype != "F32":
            raise _Invalid(f"tensor {name!r}", f"dtype is {dtype}; predictors are float32 (F32)")
        if part.startswith("block") and version < 2:
            raise _Invalid(f"tensor {name!r}", f"block-diagonal maps need format_version 2, the file says {version}")
        parts.setdefault((kind, layer), {})[part] = shape
    if not parts:
        return {}
    layout = {}
    for kind in ("key", "value"):
        inputs = 1 if kind == "key" else 2
        for layer in range(n):
            if layer in exact:
                continue
            found = parts.get((kind, layer))
            if found is None:
                raise _Invalid(f"tensor '{kind}.{layer}.bias'", f"missing: the file has maps for some layers but not "
                                                                f"for {kind} layer {layer} (model.num_layers = {n})")
            start = sources[layer] is None
            if any(p.startswith("block") for p in found) and not start:
                layout[kind, layer] = _check_blocks(kind, layer, found, inputs, info)
            else:
                layout[kind, layer] = _check_map(kind, layer, found, inputs * c, c, start)
    return layout


def _check_map(kind: str, layer: int, shapes: dict[str, tuple[int, ...]], c_in: int, c: int, start: bool
               ) -> tuple[str, ...]:
    """start: the first compressed layer (layer 0 unless exact layers precede it): intercept only."""
    allowed = [("bias",)] if start else [("bias", "weight"), ("bias", "down", "up")]
    present = tuple(p for p in ("bias", "weight", "down", "up") if p in shapes)
    if present not in allowed or len(present) != len(shapes):
        want = " or ".join("+".join(a) for a in allowed)
        raise _Invalid(f"tensors '{kind}.{layer}.*'", f"has {'+'.join(sorted(shapes))}; layer {layer} needs {want}")
    rank = shapes["up"][0] if "up" in shapes and len(shapes["up"]) == 2 else None
    expected = {"bias": (c,), "weight": (c_in, c), "down": (c_in, rank), "up": (rank, c)}
    for part in present:
        if shapes[part] != expected[part] or (part == "up" and (rank is None or rank < 1)):
            what = "[r, C] with r >= 1" if part == "up" else f"{list(expected[part])}"
            raise _Invalid(f"tensor '{kind}.{layer}.{part}'", f"shape {list(shapes[part])}, expected {what} "
                                                             f"(C = model.kv_width = {c})")
    return present


def _check_blocks(kind: str, layer: int, shapes: dict[str, tuple[int, ...]], inputs: int, info: dict
                  ) -> tuple[str, ...]:
    """A block-diagonal map: bias + block_weight.<i> for every input, or bias + block_down.<i> + block_up."""
    c, heads = info["kv_width"], info["num_kv_heads"]
    low = "block_up" in shapes
    stem = "block_down" if low else "block_weight"
    present = ("bias", *(f"{stem}.{i}" for i in range(inputs)), *(("block_up",) if low else ()))
    if set(shapes) != set(present):
        raise _Invalid(f"tensors '{kind}.{layer}.*'", f"has {'+'.join(sorted(shapes))}; a block-diagonal map needs "
                                                      f"{'+'.join(present)}")
    first = shapes[f"{stem}.0"]
    g = first[0] if len(first) == 3 else None
    if g is None or g < 2 or heads % g:
        raise _Invalid(f"tensor '{kind}.{layer}.{stem}.0'", f"shape {list(first)}: the groups G (first dim) must be "
                                                           f">= 2 and divide model.num_kv_heads = {heads}")
    rank = shapes["block_up"][1] if low and len(shapes["block_up"]) == 3 else None
    if low and (rank is None or not 1 <= rank <= c // g):
        raise _Invalid(f"tensor '{kind}.{layer}.block_up'", f"shape {list(shapes['block_up'])}, expected [G, r, C/G] "
                                                            f"with 1 <= r <= C/G = {c // g} (G = {g})")
    m = rank if low else c // g
    expected = {"bias": (c,), "block_up": (g, rank, c // g), **{f"{stem}.{i}": (g, c // g, m) for i in range(inputs)}}
    for part in present:
        if shapes[part] != expected[part]:
            raise _Invalid(f"tensor '{kind}.{layer}.{part}'", f"shape {list(shapes[part])}, expected "
                                                             f"{list(expected[part])} (C = model.kv_width = {c}, G = {g})")
    return present


def _check_values(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise _Invalid(f"tensor {name!r}", "holds NaN or Inf values")


# ---- JSON helpers -------------------------------------------------------------------------------------------------
def _check_keys(obj, field: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    if not isinstance(obj, dict):
        raise _Invalid(field, f"must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise _Invalid(f"{field}.{missing[0]}" if field != "metadata" else missing[0], "missing")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise _Invalid(f"{field}.{unknown[0]}" if field != "metadata" else unknown[0], "unknown field")


def _check_flat(obj, field: str) -> None:
    """A dict of plain JSON scalars (numbers may be NaN: a report marks undefined ratios that way)."""
    if not isinstance(obj, dict):
        raise _Invalid(field, f"must be a JSON object, got {type(obj).__name__}")
    for key, value in obj.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise _Invalid(f"{field}.{key}", f"must be a number, string, bool or null, got {type(value).__name__}")


def _check_int(value, field: str, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise _Invalid(field, f"must be an integer in {low}..{high}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # (math.isfinite of a huge int overflows)
