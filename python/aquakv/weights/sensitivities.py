"""Per-layer sensitivities alpha_i for the bit allocation (docs/weights.md, the "linearity theorem").

alpha_i = d NLL / d (relative MSE of layer i): Gaussian noise of a known relative size t^2 is added to layer i
alone and the calibration NLL watched. Noise in block k leaves blocks < k as they were, so only blocks k.. are
re-run (aquakv.runner.LayerRunner): on average half the model per measurement.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from aquakv.atomic_writes import write_json_atomic
from aquakv.evaluation.nll import token_nll
from aquakv.progress import progress as progress_bar
from aquakv.runner import LayerRunner, Trace
from aquakv.weights.quantize import quantizable_linears

log = logging.getLogger(__name__)


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

    def save(self, path: str | os.PathLike) -> Path:
        """Write the measurement as JSON (atomically: a crash leaves the old file or none). Returns the path."""
        return write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivities":
        """Read a file written by `save`; a malformed one raises ValueError naming the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sensitivities file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"sensitivities file {path}: not valid JSON ({e})") from None
        _check_fields(data, path)
        return cls(**data)

    def for_layers(self, names: Sequence[str]) -> np.ndarray:
        """alpha in the order of `names`; a missing layer raises (the file was measured on another model)."""
        index = dict(zip(self.names, self.alpha))
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"sensitivities: no measurement for {len(missing)} layers, e.g. {missing[:3]} "
                             f"(measured on a different model or with different include_lm_head?)")
        return np.array([index[n] for n in names], dtype=np.float64)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_fields(data, path: Path) -> None:
    """Types, lengths and finite numbers of a loaded sensitivities file."""
    def bad(name: str, problem: str) -> ValueError:
        return ValueError(f"sensitivities file {path}: field {name!r} {problem}")

    if not isinstance(data, dict):
        raise ValueError(f"sensitivities file {path}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(Sensitivities)}
    for name in sorted(set(data) - known):
        raise bad(name, f"is not a Sensitivities field (known: {sorted(known)})")
    for name in ("names", "alpha", "base_nll", "noise", "antithetic", "windows", "window_len", "seconds"):
        if name not in data:
            raise bad(name, "is missing")
    names, alpha = data["names"], data["alpha"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise bad("names", "must be a non-empty list of layer names")
    if len(set(names)) != len(names):
        raise bad("names", "has duplicate layer names")
    if not isinstance(alpha, list) or len(alpha) != len(names):
        raise bad("alpha", f"must be a list of {len(names)} numbers (one per name)")
    if not all(_is_number(a) and math.isfinite(a) for a in alpha):
        raise bad("alpha", "holds a non-finite or non-numeric value")
    for name in ("base_nll", "seconds"):
        if not _is_number(data[name]) or not math.isfinite(data[name]):
            raise bad(name, f"must be a finite number, got {data[name]!r}")
    if not _is_number(data["noise"]) or not 0 < data["noise"] < 1:
        raise bad("noise", f"must be a number in (0, 1), got {data['noise']!r}")
    if not isinstance(data["antithetic"], bool):
        raise bad("antithetic", f"must be true or false, got {data['antithetic']!r}")
    for name, low in (("windows", 1), ("window_len", 2)):
        if not isinstance(data[name], int) or isinstance(data[name], bool) or data[name] < low:
            raise bad(name, f"must be an integer >= {low}, got {data[name]!r}")
    if data.get("method", "suffix") not in ("suffix", "full"):
        raise bad("method", f"must be 'suffix' or 'full', got {data['method']!r}")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise bad("extra", "must be a JSON object")
    stderr = extra.get("alpha_stderr")
    # NaN is a legitimate standard error (one calibration window); only the shape and type are checked
    if stderr is not None and (not isinstance(stderr, list) or len(stderr) != len(names)
                               or not all(_is_number(x) for x in stderr)):
        raise bad("extra.alpha_stderr", f"must be a list of {len(names)} numbers")


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """logits [B, T, V], ids [B, T] -> float64 [B] mean next-token NLL of each window."""
    return token_nll(logits[:, :-1], ids[:, 1:]).double().mean(dim=1).cpu().numpy()


class SuffixNLL:
    """The calibration NLL per window, re-running only the decoder blocks from a given one onwards.

    One recorded forward per batch keeps every block's inputs (aquakv.runner.Trace). Re-running from block 0 is
    checked against the model's own NLL on construction; a model the runner cannot replay exactly (or at all)
    falls back to full forwards, with a warning.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        self.model = model
        self.batches = windows.to(next(model.parameters()).device).split(batch_size)
        self.base_window_nll = self._full_window_nll()
        self.base_nll = float(self.base_window_nll.mean())
        self.runner: LayerRunner | None = None
        self.traces: list[Trace] = []
        try:
            runner = LayerRunner(model)
        except ValueError as e:
            log.warning("sensitivities: %s; using full forwards (slower)", e)
            return
        if not runner.can_replay_logits:
            log.warning("sensitivities: no final norm / output head found; using full forwards (slower)")
            return
        self.runner = runner
        self.traces = [runner.record(batch) for batch in self.batches]
        for trace in self.traces:
            trace.logits = None  # the [B, T, V] logits are not needed again
        suffix = self.nll(0)
        if abs(suffix - self.base_nll) > 1e-4 * max(1.0, abs(self.base_nll)):
            log.warning("sensitivities: re-running blocks gives NLL %.6f but the model gives %.6f; "
                        "using full forwards (slower)", suffix, self.base_nll)
            self.runner, self.traces = None, []

    @property
    def enabled(self) -> bool:
        """Whether measurements re-run only the blocks after the perturbed layer."""
        return self.runner is not None

    @torch.no_grad()
    def _full_window_nll(self) -> np.ndarray:
        return np.concatenate([_window_nll(self.model(input_ids=batch, use_cache=False).logits, batch)
                               for batch in self.batches])

    def block_of(self, module: nn.Module) -> int:
        """Index of the first block whose output the module changes (num_layers for the head; 0 without a runner)."""
        if self.runner is None:
            return 0
        index = self.runner.block_of(module)
        return 0 if index is None else index

    def nll(self, start: int) -> float:
        """Mean NLL per predicted token (windows have equal length)."""
        return float(self.window_nll(start).mean())

    @torch.no_grad()
    def window_nll(self, start: int) -> np.ndarray:
        """[windows] mean NLL per predicted token of each window, re-running blocks start.."""
        if self.runner is None:
            return self._full_window_nll()
        return np.concatenate([_window_nll(self.runner.replay(trace, start), batch)
                               for trace, batch in zip(self.traces, self.batches)])


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
    runner = SuffixNLL(model, windows, batch_size)
    gen = torch.Generator().manual_seed(seed)
    alpha, stderr = [], []
    for name in progress_bar(names, desc="sensitivities", enabled=progress, unit="layer"):
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
