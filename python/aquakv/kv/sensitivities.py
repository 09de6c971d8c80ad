"""Per-layer, per-K/V sensitivities for the KV bit allocation (docs/method.md, the linearity theorem for KV).

alpha^K_l = d NLL / d (relative MSE of layer l's keys), alpha^V_l likewise: Gaussian noise of a known relative size
t^2 is added to one layer's keys (or values) alone, token by token (||n_t||^2 = t^2 ||k_t||^2, so every token is hit
in proportion to its own size, as a HIGGS scale per group does), and the calibration NLL watched. The first `sinks`
tokens of each window are left alone: the cache keeps them exact. This mirrors aquakv.weights.sensitivities (which
kv may not import): noise in block l leaves blocks < l as they were, so only blocks l.. are re-run
(aquakv.runner.LayerRunner), and +N / -N are averaged to cancel the first-order term.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from aquakv.evaluation.nll import token_nll
from aquakv.progress import progress as progress_bar  # `progress` is the argument that turns it on
from aquakv.runner import LayerRunner, decoder_layers

log = logging.getLogger(__name__)


@dataclass
class KVSensitivities:
    """keys[l] / values[l]: NLL increase (nats/token) per unit relative MSE of layer l's keys / values (NaN for
    layers not measured: those kept exact). *_stderr: standard error over calibration windows."""

    keys: list[float]
    values: list[float]
    base_nll: float
    noise: float
    windows: int
    window_len: int
    seconds: float
    stderr: dict = field(default_factory=dict)  # {"keys": [L], "values": [L]}


def _projection(block: nn.Module, part: str, layer: int) -> nn.Module:
    """The module whose output is the layer's keys (after k_norm where the model has one) or values."""
    attn = getattr(block, "self_attn", None)
    names = ("k_norm", "k_proj") if part == "keys" else ("v_proj",)
    for name in names:
        module = getattr(attn, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"KV sensitivities: decoder layer {layer} has no self_attn.{' or '.join(names)} to perturb")


class _Noise:
    """A forward hook adding sign * N to a projection's output [B, T, ...]: N drawn once per batch from `seed`,
    each token's noise scaled to sqrt(t^2) times that token's own norm, zero on the first `sinks` tokens."""

    def __init__(self, noise: float, sinks: int, seed: int):
        self.scale, self.sinks, self.seed = math.sqrt(noise), sinks, seed
        self.sign, self.batch = 1.0, 0
        self._drawn: dict[int, torch.Tensor] = {}

    def __call__(self, module, args, out):
        flat = out.reshape(out.shape[0], out.shape[1], -1).float()
        if self.batch not in self._drawn:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.batch)
            self._drawn[self.batch] = torch.randn(flat.shape, generator=gen).to(flat.device)
        z = self._drawn[self.batch]
        n = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30) * flat.norm(dim=-1, keepdim=True) * self.scale
        n[:, :self.sinks] = 0
        return (flat + self.sign * n).to(out.dtype).reshape(out.shape)


class _SuffixNLL:
    """Per-window NLL re-running blocks start.. from one recorded forward per batch; full forwards when the runner
    cannot replay the model exactly (checked once against the model's own NLL)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        self.model, self.batches = model, windows.split(batch_size)
        self.runner: LayerRunner | None = None
        self.base = self._full()
        try:
            runner = LayerRunner(model)
            if runner.can_replay_logits:
                self.runner, self.traces = runner, [runner.record(b) for b in self.batches]
                for t in self.traces:
                    t.logits = None  # [B, T, V] not needed again
                if abs(self.nll(0, lambda i: None).mean() - self.base.mean()) > 1e-4 * max(1.0, abs(self.base.mean())):
                    log.warning("KV sensitivities: replaying blocks changes the NLL; using full forwards (slower)")
                    self.runner = None
        except ValueError as e:
            log.warning("KV sensitivities: %s; using full forwards (slower)", e)
            self.runner = None

    def _full(self, on_batch=lambda i: None) -> np.ndarray:
        out = []
        for i, b in enumerate(self.batches):
            on_batch(i)
            out.append(_mean_nll(self.model(input_ids=b, use_cache=False).logits, b))
        return np.concatenate(out)

    @torch.no_grad()
    def nll(self, start: int, on_batch) -> np.ndarray:
        """[windows] mean NLL per predicted token; on_batch(i) is called before batch i runs."""
        if self.runner is None:
            return self._full(on_batch)
        out = []
        for i, (trace, b) in enumerate(zip(self.traces, self.batches)):
            on_batch(i)
            out.append(_mean_nll(self.runner.replay(trace, start), b))
        return np.concatenate(out)


def _mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    return token_nll(logits[:, :-1], ids[:, 1:]).double().mean(dim=1).cpu().numpy()


@torch.no_grad()
def measure_kv_sensitivities(model: nn.Module, windows: torch.Tensor, *, noise: float = 0.01, sinks: int = 4,
                             seed: int = 0, exact_layers: Sequence[int] = (), batch_size: int = 4,
                             progress: bool = True) -> KVSensitivities:
    """alpha^K_l and alpha^V_l of every layer not in exact_layers. windows: [B, T] calibration token ids.
    noise: t^2, the relative MSE of the injected noise (in (0, 1))."""
    if windows.dim() != 2 or windows.shape[1] <= sinks + 1:
        raise ValueError(f"KV sensitivities: windows must be [count, length > sinks + 1] token ids, got "
                         f"{tuple(windows.shape)} with sinks={sinks}")
    if not 0 < noise < 1:
        raise ValueError(f"KV sensitivities: noise (relative MSE t^2) must be in (0, 1), got {noise}")
    t0 = time.perf_counter()
    windows = windows.to(next(model.parameters()).device)
    blocks = decoder_layers(model)
    suffix = _SuffixNLL(model, windows, batch_size)
    alpha = {p: [math.nan] * len(blocks) for p in ("keys", "values")}
    stderr = {p: [math.nan] * len(blocks) for p in ("keys", "values")}
    todo = [(layer, part) for layer in range(len(blocks)) if layer not in set(exact_layers)
            for part in ("keys", "values")]
    for layer, part in progress_bar(todo, desc="KV sensitivities", enabled=progress, unit="part"):
        hook = _Noise(noise, sinks, seed * 100003 + 2 * layer + (part == "values"))
        handle = _projection(blocks[layer], part, layer).register_forward_hook(hook)
        nlls = []
        try:
            for sign in (1.0, -1.0):
                hook.sign = sign
                nlls.append(suffix.nll(layer, lambda i: setattr(hook, "batch", i)))
        finally:
            handle.remove()
        per_window = ((nlls[0] + nlls[1]) / 2 - suffix.base) / noise
        alpha[part][layer] = float(per_window.mean())
        if len(per_window) > 1:
            stderr[part][layer] = float(per_window.std(ddof=1) / math.sqrt(len(per_window)))
    return KVSensitivities(alpha["keys"], alpha["values"], float(suffix.base.mean()), noise, windows.shape[0],
                           windows.shape[1], time.perf_counter() - t0, stderr)
