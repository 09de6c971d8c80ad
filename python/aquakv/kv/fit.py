"""Closed-form fits of the AQUA-KV predictors, layer by layer in order with quantization in the loop
(docs/method.md): each layer's regression inputs are the previous layer's reconstructions, exactly as inference
sees them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from aquakv.kv.affine_map import AffineMap
from aquakv.kv.predictor_settings import AquaKVSettings
from aquakv.kv.predictors import AquaKVPredictors
from aquakv.progress import progress as progress_bar  # `progress` is the argument that turns it on
from aquakv.quantizer import HiggsQuantizer

log = logging.getLogger(__name__)

STRUCTURES = ("full", "per-head")  # dense maps; block diagonal over KV heads (docs/predictor_structures.md)
_ROWS_PER_STEP = 16384  # rows moved to the compute device at a time: bounds memory, keeps matmuls large


@dataclass
class _Moments:
    """float64 sums over fit rows: n, sum x, sum y, X^T X, X^T Y."""

    n: int
    sx: torch.Tensor
    sy: torch.Tensor
    xtx: torch.Tensor
    xty: torch.Tensor


def structure_groups(structure: str, num_kv_heads: int) -> int:
    """G of the predictors' maps for a structure: 1 for "full", the KV heads for "per-head"."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    return num_kv_heads if structure == "per-head" else 1


def _chunks(n: int):
    for start in range(0, n, _ROWS_PER_STEP):
        yield start, min(start + _ROWS_PER_STEP, n)


def _gather(parts: list[torch.Tensor], start: int, stop: int, device: torch.device) -> list[torch.Tensor]:
    return [p[start:stop].to(device, torch.float32) for p in parts]


def _moments(inputs: list[torch.Tensor], target: torch.Tensor, n_fit: int, device: torch.device) -> _Moments:
    c_in, c_out = sum(x.shape[1] for x in inputs), target.shape[1]
    f64 = dict(dtype=torch.float64, device=device)
    m = _Moments(n_fit, torch.zeros(c_in, **f64), torch.zeros(c_out, **f64), torch.zeros(c_in, c_in, **f64),
                 torch.zeros(c_in, c_out, **f64))
    for start, stop in _chunks(n_fit):
        x = torch.cat(_gather(inputs, start, stop, device), dim=1).double()
        y = target[start:stop].to(device, torch.float64)
        m.sx += x.sum(0)
        m.sy += y.sum(0)
        m.xtx += x.T @ x
        m.xty += x.T @ y
    return m


def fit_ridge(m: _Moments, damping: float, rank: int | None) -> AffineMap:
    """Ridge regression with an unpenalized intercept: W = (Sxx + lam I)^-1 Sxy on centered moments,
    lam = damping * mean(diag Sxx). Reduced rank r: W projected onto the top-r right singular vectors of the
    fitted values X_c W (eigenvectors of W^T Sxx W), stored as down = W U_r [C_in, r] and up = U_r^T [r, C_out]."""
    mx, my = m.sx / m.n, m.sy / m.n
    sxx = m.xtx - m.n * torch.outer(mx, mx)
    sxy = m.xty - m.n * torch.outer(mx, my)
    lam = damping * sxx.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(sxx.shape[0], dtype=sxx.dtype, device=sxx.device)
    w = torch.linalg.solve(sxx + lam * eye, sxy)
    if rank is not None and rank < min(w.shape):
        _, vecs = torch.linalg.eigh(w.T @ sxx @ w)  # ascending eigenvalues
        u = vecs[:, -rank:]
        down, up = w @ u, u.T
        bias = my - mx @ down @ up
        return AffineMap(bias=bias.float().cpu(), down=down.float().cpu().contiguous(), up=up.float().cpu().contiguous())
    bias = my - mx @ w
    return AffineMap(bias=bias.float().cpu(), weight=w.float().cpu().contiguous())


def fit_ridge_blocks(m: _Moments, in_widths: list[int], groups: int, damping: float, rank: int | None) -> AffineMap:
    """Block-diagonal ridge over G groups of channels (per KV head): the objective decouples into G independent ridge
    regressions, output group g on group g of every input alone, each exactly `fit_ridge` on its own moments (its own
    lam = damping * mean of its own diag Sxx; rank r per group by the same projection). in_widths: the widths of the
    inputs whose concatenation the moments are over. G = 1 is `fit_ridge` itself (a dense map)."""
    c_out = m.sy.shape[0]
    if groups < 1 or c_out % groups or any(w % groups for w in in_widths) or sum(in_widths) != m.sx.shape[0]:
        raise ValueError(f"fit_ridge_blocks: {groups} groups do not divide inputs of widths {in_widths} and "
                         f"{c_out} outputs")
    if groups == 1:
        return fit_ridge(m, damping, rank)
    starts = [sum(in_widths[:i]) for i in range(len(in_widths))]
    sizes, out = [w // groups for w in in_widths], c_out // groups
    fits = []
    for g in range(groups):
        rows = torch.cat([torch.arange(s + g * d, s + (g + 1) * d) for s, d in zip(starts, sizes)]).to(m.sx.device)
        cols = slice(g * out, (g + 1) * out)
        fits.append(fit_ridge(_Moments(m.n, m.sx[rows], m.sy[cols], m.xtx[rows][:, rows], m.xty[rows][:, cols]),
                              damping, rank))
    low = fits[0].up is not None  # the same for every group: the rank test only sees the group's shapes
    per_group = [f.down if low else f.weight for f in fits]  # [sum_i C_i/G, M], rows input by input
    blocks = tuple(torch.stack([w.split(sizes)[i] for w in per_group]).contiguous() for i in range(len(sizes)))
    up = torch.stack([f.up for f in fits]).contiguous() if low else None
    return AffineMap(bias=torch.cat([f.bias for f in fits]), blocks=blocks, block_up=up)


def _mean_map(target: torch.Tensor, n_fit: int, device: torch.device) -> AffineMap:
    total = torch.zeros(target.shape[1], dtype=torch.float64, device=device)
    for start, stop in _chunks(n_fit):
        total += target[start:stop].to(device, torch.float64).sum(0)
    return AffineMap(bias=(total / n_fit).float().cpu())


@dataclass
class _Errors:
    """Held-out sums of squares: target, prediction error, reconstruction error, HIGGS-only error."""

    y: float = 0.0
    pred: float = 0.0
    recon: float = 0.0
    higgs: float = 0.0
    candidates: list[float] = field(default_factory=list)  # reconstruction error with each candidate quantizer

    def relative(self, prefix: str) -> dict[str, float]:
        y = max(self.y, 1e-30)
        return {f"{prefix}_pred_rel_mse": self.pred / y, f"{prefix}_rel_err": self.recon / y,
                f"{prefix}_higgs_rel_err": self.higgs / y}


def _reconstruct(amap: AffineMap | None, inputs: list[torch.Tensor], target: torch.Tensor,
                 quantizer: HiggsQuantizer | None, n_fit: int, device: torch.device, store: torch.device,
                 candidates: Sequence[HiggsQuantizer] = ()) -> tuple[torch.Tensor, _Errors]:
    """Y^ = P + Q(Y - P) over all rows (float32 [N, C] on `store`), and held-out errors. quantizer None: fp16.
    candidates: other quantizers whose held-out reconstruction error of the same residual is measured too (the
    e_lj of the bit allocation, aquakv.kv.bit_allocation)."""
    n = target.shape[0]
    hat = torch.empty(target.shape, dtype=torch.float32, device=store)
    err = _Errors(candidates=[0.0] * len(candidates))

    def q(x: torch.Tensor) -> torch.Tensor:
        return x.half().float() if quantizer is None else quantizer.quantize_dequantize(x)

    for start, stop in _chunks(n):
        y = target[start:stop].to(device, torch.float32)
        pred = None if amap is None else (amap(*_gather(inputs, start, stop, device)) if inputs else amap.bias.to(device))
        y_hat = q(y) if pred is None else pred + q(y - pred)
        hat[start:stop] = y_hat.to(store)
        held = max(n_fit - start, 0)  # rows from here on are held out
        if held < stop - start:
            yh, yh_hat = y[held:], y_hat[held:]
            err.y += yh.pow(2).sum().item()
            err.pred += (yh if pred is None else yh - pred.expand_as(y)[held:]).pow(2).sum().item()
            err.recon += (yh_hat - yh).pow(2).sum().item()
            err.higgs += (q(yh) - yh).pow(2).sum().item()
            residual = yh if pred is None else yh - pred.expand_as(y)[held:]
            for j, c in enumerate(candidates):
                err.candidates[j] += (c.quantize_dequantize(residual) - residual).pow(2).sum().item()
    return hat, err


class SequentialFit:
    """Fits the predictors one layer at a time, in order, with quantization in the loop: each layer's regression
    inputs are the previous compressed layer's reconstructions, exactly as inference will see them. Only those
    reconstructions (float32 [N, C], on `store`) are kept between layers. Exact layers (a hybrid model's local
    layers, aquakv.kv.local_layers) get no maps and leave the chain as it was."""

    def __init__(self, n_fit: int, settings: AquaKVSettings, rank: int | None, damping: float, device: torch.device,
                 store: torch.device, structure: str = "full", groups: int = 1,
                 candidates: Sequence[HiggsQuantizer] = ()):
        self.n_fit, self.settings, self.rank, self.damping = n_fit, settings, rank, damping
        self.structure, self.groups = structure, groups  # groups: G of the block-diagonal maps (1: dense)
        self.device, self.store = device, store
        self.candidates = list(candidates)
        # per compressed layer: {"layer", "keys": [e_j], "values": [e_j]} held-out relative errors per candidate
        self.candidate_errors: list[dict] = []
        self.key_maps: list[AffineMap | None] = []
        self.value_maps: list[AffineMap | None] = []
        self.exact_layers: list[int] = []
        self.report: list[dict] = []
        self.n_rows = 0
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None  # K^_s, V^_s of the last compressed layer s

    def add_layer(self, keys: torch.Tensor, values: torch.Tensor, exact: bool = False) -> None:
        """keys, values: the next layer's captured states [N, C] (fit rows first, held-out rows last).
        exact: the layer is kept exact by the cache (no maps; keys and values are not used)."""
        layer, n_fit, device = len(self.key_maps), self.n_fit, self.device
        self.n_rows = keys.shape[0]
        if exact:
            self.key_maps.append(None)
            self.value_maps.append(None)
            self.exact_layers.append(layer)
            return
        start = self._prev is None  # nothing to predict from: intercept only, layer 0's quantizer
        k_quantizer, v_quantizer = (self.settings.quantizer_for(start, layer, part) for part in ("keys", "values"))
        if start:
            k_map, k_inputs = _mean_map(keys, n_fit, device), []
        else:
            k_inputs = [self._prev[0]]
            k_map = self._fit(k_inputs, keys)
        k_hat, k_err = _reconstruct(k_map, k_inputs, keys, k_quantizer, n_fit, device, self.store, self.candidates)
        if start:
            v_map, v_inputs = _mean_map(values, n_fit, device), []
        else:
            v_inputs = [k_hat, self._prev[1]]
            v_map = self._fit(v_inputs, values)
        v_hat, v_err = _reconstruct(v_map, v_inputs, values, v_quantizer, n_fit, device, self.store, self.candidates)
        self.key_maps.append(k_map)
        self.value_maps.append(v_map)
        self.report.append({"layer": layer, **k_err.relative("key"), **v_err.relative("value")})
        if self.candidates:
            self.candidate_errors.append({"layer": layer, "chain_start": start,
                                          **{p: [e / max(err.y, 1e-30) for e in err.candidates]
                                             for p, err in (("keys", k_err), ("values", v_err))}})
        log.debug("layer %d: %s", layer, self.report[-1])
        self._prev = (k_hat, v_hat)

    def _fit(self, inputs: list[torch.Tensor], target: torch.Tensor) -> AffineMap:
        m = _moments(inputs, target, self.n_fit, self.device)
        if self.groups == 1:  # the dense fit, untouched
            return fit_ridge(m, self.damping, self.rank)
        return fit_ridge_blocks(m, [x.shape[1] for x in inputs], self.groups, self.damping, self.rank)

    def predictors(self, model_info: dict) -> AquaKVPredictors:
        calibration = {"fit_tokens": self.n_fit, "held_out_tokens": self.n_rows - self.n_fit,
                       "damping": self.damping, "rank": self.rank, "structure": self.structure}
        return AquaKVPredictors(self.key_maps, self.value_maps, self.settings, model_info, self.report, calibration,
                                exact_layers=self.exact_layers)


@torch.no_grad()
def fit_predictors(keys: list[torch.Tensor], values: list[torch.Tensor], n_fit: int, settings: AquaKVSettings,
                   model_info: dict, *, rank: int | None = None, structure: str = "full", damping: float = 1e-3,
                   device: torch.device | str = "cpu", offload: bool = True, progress: bool = True,
                   exact_layers=()) -> AquaKVPredictors:
    """The fitting half of `calibrate`, on captured states (see `aquakv.kv.capture.capture_states`): rows [N, C] per
    layer, the first n_fit rows for fitting and the rest held out for the report. The lists are not modified.
    structure: "full" (dense maps) or "per-head" (block diagonal over model_info's KV heads).
    exact_layers: layers the cache keeps exact (`aquakv.kv.local_layers.exact_local_layers(model.config)`)."""
    device = torch.device(device)
    fit = SequentialFit(n_fit, settings, rank, damping, device, torch.device("cpu") if offload else device,
                         structure, structure_groups(structure, model_info["num_kv_heads"]))
    exact = set(exact_layers)
    for layer, (k, v) in enumerate(progress_bar(list(zip(keys, values)), desc="aquakv: fitting layers",
                                                enabled=progress, unit="layer")):
        fit.add_layer(k if offload else k.to(device), v if offload else v.to(device), exact=layer in exact)
    return fit.predictors(model_info)
