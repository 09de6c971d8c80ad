"""Calibration of AQUA-KV predictors (DESIGN.md §2): capture pre-RoPE keys and values on calibration text one layer
at a time (aquakv.capture) and fit that layer's affine predictors in closed form, in layer order, with quantization
in the loop.

    preds = aquakv.calibrate(model, token_ids_or_texts, bits=2, tokenizer=tok, window=1024, max_windows=64)
"""
from __future__ import annotations

import logging
import math
import sys
import time
import types
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from aquakv.capture import capture_states, iter_layer_states  # noqa: F401  (capture_states: part of this API)
from aquakv.predictors import AffineMap, AquaKVPredictors, AquaKVSettings, _layer0_bits
from aquakv.quantizer import HiggsQuantizer

log = logging.getLogger(__name__)

_ROWS_PER_STEP = 16384  # rows moved to the compute device at a time: bounds memory, keeps matmuls large


# ---------------------------------------------------------------------------------------------------------------
# Data -> windows


def make_windows(data, tokenizer=None, window: int = 1024, max_windows: int | None = None,
                 min_tokens: int = 1) -> list[torch.Tensor]:
    """Calibration windows: 1-D LongTensors of at most `window` tokens.

    data: a list of 1-D LongTensors (each cut into consecutive windows; a shorter tail is kept as its own window),
          a single 1-D LongTensor, or a list of strings with `tokenizer` (concatenated with EOS, then cut).
    max_windows: keep this many windows spread evenly over all of them (deterministic), not just the first ones.
    min_tokens: drop windows with fewer tokens.
    """
    from aquakv.data import tokenize

    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if isinstance(data, torch.Tensor):
        data = [data]
    if isinstance(data, str) or not isinstance(data, Sequence) or len(data) == 0:
        raise TypeError("data must be a non-empty list of 1-D LongTensors of token ids, or of strings with tokenizer=")
    if all(isinstance(d, str) for d in data):
        if tokenizer is None:
            raise ValueError("data is a list of strings: pass tokenizer= to turn them into token ids")
        data = [tokenize(tokenizer, data)]
    seqs = []
    for i, d in enumerate(data):
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.is_floating_point() or d.is_complex():
            raise TypeError(f"data[{i}] must be a 1-D integer tensor of token ids, got "
                            f"{type(d).__name__ if not isinstance(d, torch.Tensor) else f'{d.dtype} {tuple(d.shape)}'}")
        seqs += [w.long() for w in d.split(window) if w.numel() >= min_tokens]
    if not seqs:
        raise ValueError(f"no calibration window holds at least {min_tokens} tokens")
    if max_windows is not None and max_windows < len(seqs):
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        seqs = [seqs[(i * len(seqs)) // max_windows] for i in range(max_windows)]
    return seqs


# ---------------------------------------------------------------------------------------------------------------
# Fitting


@dataclass
class _Moments:
    """float64 sums over fit rows: n, sum x, sum y, X^T X, X^T Y."""

    n: int
    sx: torch.Tensor
    sy: torch.Tensor
    xtx: torch.Tensor
    xty: torch.Tensor


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

    def relative(self, prefix: str) -> dict[str, float]:
        y = max(self.y, 1e-30)
        return {f"{prefix}_pred_rel_mse": self.pred / y, f"{prefix}_rel_err": self.recon / y,
                f"{prefix}_higgs_rel_err": self.higgs / y}


def _reconstruct(amap: AffineMap | None, inputs: list[torch.Tensor], target: torch.Tensor,
                 quantizer: HiggsQuantizer | None, n_fit: int, device: torch.device, store: torch.device
                 ) -> tuple[torch.Tensor, _Errors]:
    """Y^ = P + Q(Y - P) over all rows (float32 [N, C] on `store`), and held-out errors. quantizer None: fp16."""
    n = target.shape[0]
    hat = torch.empty(target.shape, dtype=torch.float32, device=store)
    err = _Errors()

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
    return hat, err


def _split(windows: list[torch.Tensor], sinks: int, held_out: float) -> tuple[int, int]:
    """(fit rows, held-out rows) of the captured rows: the last `held_out` share of windows is held out (of a
    single window: its last share of rows)."""
    counts = [max(w.numel() - sinks, 0) for w in windows]
    total = sum(counts)
    if len(windows) >= 2:
        n_hold = min(max(1, round(held_out * len(windows))), len(windows) - 1)
        held = sum(counts[-n_hold:])
    else:
        held = int(total * held_out)
    if total - held < 2 or held < 1:
        raise ValueError(f"calibration has {total} usable tokens (after {sinks} sink tokens per window): too few to "
                         f"fit and hold out; pass more or longer windows")
    return total - held, held


@torch.no_grad()
def calibrate(model, data, bits: float = 2, *, tokenizer=None, window: int = 1024, max_windows: int | None = None,
              rank: int | None = None, group_size: int | None = None, grid_dim: int = 2,
              layer0_bits: float | str = 4, seed: int = 0, device: str | torch.device | None = None,
              offload: bool = True, damping: float = 1e-3, sinks: int = 4, held_out: float = 0.1,
              progress: bool = True) -> AquaKVPredictors:
    """Fit AQUA-KV predictors for `model` on calibration data.

    data: 1-D LongTensors of token ids (any length, cut into windows of `window` tokens) or strings + tokenizer=.
    bits: code bits per value for layers >= 1 (HIGGS grid (grid_dim, 2**(bits*grid_dim)), group_size = head_dim
      by default). layer0_bits: bits of layer 0's centered quantizer, or "fp16" to keep layer 0 exact.
    rank: reduced-rank predictors (two factors of rank r) instead of dense C x C / 2C x C maps.
    damping: ridge damping relative to the mean diagonal of the centered X^T X. sinks: leading tokens of each window
      left out (the cache keeps them exact). held_out: share of windows held out for the per-layer report.
    device: where the fit runs (default: the model's device). The model runs one decoder layer at a time over all
      windows (aquakv.capture), so memory holds the hidden states entering one layer plus that layer's states and
      the previous layer's reconstructions, for all calibration tokens, whatever the depth of the model.
      offload=True keeps those on the CPU and streams them through `device`; offload=False keeps them on the
      devices (faster on a GPU with room to spare).
    Deterministic for fixed inputs and settings. The report (predictors.report) holds per layer the held-out
    relative MSE of the predictions, of the final reconstruction, and of HIGGS alone at the same bits.
    """
    t0 = time.perf_counter()
    info = AquaKVPredictors.model_info_of(model)
    settings = AquaKVSettings(bits=bits, grid_dim=grid_dim, seed=seed, layer0_bits=_layer0_bits(layer0_bits),
                              group_size=group_size or AquaKVPredictors.default_group_size(info["head_dim"]))
    settings.quantizer(0), settings.quantizer(1)  # validates bits/grid/group before the slow part
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 or None, got {rank}")
    windows = make_windows(data, tokenizer, window, max_windows, min_tokens=sinks + 1)
    n_fit, _ = _split(windows, sinks, held_out)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fit = _SequentialFit(n_fit, settings, rank, damping, device, torch.device("cpu") if offload else device)
    with tqdm(total=info["num_layers"], desc="aquakv: calibrating layers", unit="layer", disable=not progress) as bar:
        for _, keys, values in iter_layer_states(model, windows, sinks, offload=offload, progress=bar):
            fit.add_layer(keys, values)
    preds = fit.predictors(info)
    preds.calibration.update({"windows": len(windows), "window": window, "sinks": sinks,
                              "seconds": round(time.perf_counter() - t0, 1)})
    _log_summary(preds)
    return preds


class _SequentialFit:
    """Fits the predictors one layer at a time, in order, with quantization in the loop: each layer's regression
    inputs are the previous layer's reconstructions, exactly as inference will see them. Only the previous layer's
    reconstructions (float32 [N, C], on `store`) are kept between layers."""

    def __init__(self, n_fit: int, settings: AquaKVSettings, rank: int | None, damping: float, device: torch.device,
                 store: torch.device):
        self.n_fit, self.settings, self.rank, self.damping = n_fit, settings, rank, damping
        self.device, self.store = device, store
        self.quantizers = [settings.quantizer(0), settings.quantizer(1)]
        self.key_maps: list[AffineMap] = []
        self.value_maps: list[AffineMap] = []
        self.report: list[dict] = []
        self.n_rows = 0
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None  # K^_{l-1}, V^_{l-1}

    def add_layer(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: the next layer's captured states [N, C] (fit rows first, held-out rows last)."""
        layer, n_fit, device = len(self.key_maps), self.n_fit, self.device
        quantizer = self.quantizers[min(layer, 1)]
        if layer == 0:
            k_map, k_inputs = _mean_map(keys, n_fit, device), []
        else:
            k_inputs = [self._prev[0]]
            k_map = fit_ridge(_moments(k_inputs, keys, n_fit, device), self.damping, self.rank)
        k_hat, k_err = _reconstruct(k_map, k_inputs, keys, quantizer, n_fit, device, self.store)
        if layer == 0:
            v_map, v_inputs = _mean_map(values, n_fit, device), []
        else:
            v_inputs = [k_hat, self._prev[1]]
            v_map = fit_ridge(_moments(v_inputs, values, n_fit, device), self.damping, self.rank)
        v_hat, v_err = _reconstruct(v_map, v_inputs, values, quantizer, n_fit, device, self.store)
        self.key_maps.append(k_map)
        self.value_maps.append(v_map)
        self.report.append({"layer": layer, **k_err.relative("key"), **v_err.relative("value")})
        log.debug("layer %d: %s", layer, self.report[-1])
        self._prev = (k_hat, v_hat)
        self.n_rows = keys.shape[0]

    def predictors(self, model_info: dict) -> AquaKVPredictors:
        calibration = {"fit_tokens": self.n_fit, "held_out_tokens": self.n_rows - self.n_fit,
                       "damping": self.damping, "rank": self.rank}
        return AquaKVPredictors(self.key_maps, self.value_maps, self.settings, model_info, self.report, calibration)


@torch.no_grad()
def fit_predictors(keys: list[torch.Tensor], values: list[torch.Tensor], n_fit: int, settings: AquaKVSettings,
                   model_info: dict, *, rank: int | None = None, damping: float = 1e-3,
                   device: torch.device | str = "cpu", offload: bool = True, progress: bool = True
                   ) -> AquaKVPredictors:
    """The fitting half of `calibrate`, on captured states (see `aquakv.capture.capture_states`): rows [N, C] per
    layer, the first n_fit rows for fitting and the rest held out for the report. The lists are not modified."""
    device = torch.device(device)
    fit = _SequentialFit(n_fit, settings, rank, damping, device, torch.device("cpu") if offload else device)
    for k, v in tqdm(list(zip(keys, values)), desc="aquakv: fitting layers", disable=not progress, unit="layer"):
        fit.add_layer(k if offload else k.to(device), v if offload else v.to(device))
    return fit.predictors(model_info)


def _log_summary(preds: AquaKVPredictors) -> None:
    def mean(key: str) -> float:
        vals = [r[key] for r in preds.report[1:]] or [r[key] for r in preds.report]
        return sum(vals) / len(vals)

    log.info("calibrated %r on %d tokens (%d held out) in %.1f s", preds, preds.calibration["fit_tokens"],
             preds.calibration["held_out_tokens"], preds.calibration.get("seconds", math.nan))
    log.info("held-out relative MSE, mean over layers >= 1: prediction K %.4f V %.4f; reconstruction K %.4f V %.4f "
             "(HIGGS alone: K %.4f V %.4f)", mean("key_pred_rel_mse"), mean("value_pred_rel_mse"),
             mean("key_rel_err"), mean("value_rel_err"), mean("key_higgs_rel_err"), mean("value_higgs_rel_err"))


def format_report(preds: AquaKVPredictors) -> str:
    """The per-layer held-out report as a text table."""
    cols = ["key_pred_rel_mse", "key_rel_err", "key_higgs_rel_err", "value_pred_rel_mse", "value_rel_err",
            "value_higgs_rel_err"]
    lines = ["layer " + " ".join(f"{c:>19}" for c in cols)]
    for r in preds.report:
        lines.append(f"{r['layer']:>5} " + " ".join(f"{r[c]:>19.4f}" if math.isfinite(r[c]) else f"{'nan':>19}"
                                                     for c in cols))
    return "\n".join(lines)


class _CallableModule(types.ModuleType):
    """`aquakv.calibrate` is both this submodule and the public function (DESIGN §6). Importing the submodule binds
    the package attribute to the module, whatever `aquakv.__getattr__` returned before, so the module forwards calls
    to the function: `aquakv.calibrate(model, data)` works in every import order."""

    def __call__(self, *args, **kwargs) -> AquaKVPredictors:
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
