"""One HiggsLinear while PV-Tuning trains it: fp32 master scales, the straight-through buffer W~, a differentiable
forward (docs/pv_tuning.md). The HiggsLinear keeps the stored truth; `commit` writes codes and scales back into it.

Memory per quantized weight: the unit-scale dequantized weight (4 bytes, so a forward is one multiply), and with
a V step the buffer W~, its gradient and Adam's two moments (16 bytes). Nothing is kept for other parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aquakv.weights.linear import HiggsLinear
from aquakv.weights.pv.step import VStepOutcome, v_step_codes
from aquakv.weights.quantize import set_submodule

FP16_MAX = 65504.0


class TunedHiggsLinear(nn.Module):
    """Stands in for `layer` during tuning; y = x @ W^T + b with W = s16 * unit(codes) (+ W~ - W~.detach()).

    scale: fp32 Parameter [R], the master copy of the group scales; the forward uses its fp16 rounding (what
      the file will store) and passes the gradient straight to the fp32 value, so steps below fp16's resolution
      still accumulate. Groups whose scale is 0 (all-zero weights) stay 0.
    buffer: fp32 Parameter [out, in] = W~ (None for P-only). Its value never enters the forward; its gradient is
      dL/dW of the dequantized weight.
    """

    def __init__(self, layer: HiggsLinear, *, with_buffer: bool):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: its buffers stay out of this module's state
        self.in_features, self.out_features = layer.in_features, layer.out_features
        grid, signs = layer.quantizer.grid_and_signs(layer.codes.device)
        self.register_buffer("grid", grid, persistent=False)
        self.register_buffer("signs", signs, persistent=False)
        self.scale = nn.Parameter(layer.scales.detach().float().reshape(-1).clone())
        self.register_buffer("live", layer.scales.reshape(-1) > 0, persistent=False)
        self.unit = self._unit(layer.codes)
        self.buffer = nn.Parameter(self.dequantized().detach().clone()) if with_buffer else None
        self.bias = layer.bias

    # ---- the weight ---------------------------------------------------------------------------------------------
    def _unit(self, codes: torch.Tensor) -> torch.Tensor:
        """[R, G] float32: the groups dequantized at scale 1."""
        ones = torch.ones(codes.shape[0], 1, dtype=torch.float16, device=codes.device)
        return torch.ops.aquakv.higgs_dequantize(codes, ones, self.grid, self.signs, self.layer.group_size,
                                                 torch.float32)

    def scales16(self) -> torch.Tensor:
        """The scales the file would store now: float16 [R, 1]."""
        return self.scale.detach().half().reshape(-1, 1)

    def dequantized(self) -> torch.Tensor:
        """W [out, in] float32 as the forward sees it (differentiable in `scale`)."""
        s = self.scale + (self.scale.half().float() - self.scale).detach()  # fp16 value, fp32 gradient
        rows = (self.unit * s[:, None]).reshape(self.out_features, -1)  # [out, in_padded]: groups never cross a row
        return rows if rows.shape[1] == self.in_features else rows[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized()
        if self.buffer is not None:
            weight = weight + (self.buffer - self.buffer.detach())  # value unchanged; gradient reaches W~
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ---- after an optimizer step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def clamp_scales(self) -> None:
        """Keep every scale a valid fp16 group norm: finite, in [0, 65504], and 0 where the group was all zero."""
        self.scale.nan_to_num_(nan=0.0).clamp_(0.0, FP16_MAX).mul_(self.live)

    @torch.no_grad()
    def v_step(self, *, select: bool, max_code_change_per_step: float, code_trust_ratio: float,
               delta_decay: float) -> VStepOutcome:
        """Re-encode codes from W~ under the current scales (v_step_codes), refresh the unit weight, and move W~
        toward the new dequantized weight by delta_decay (1: reset to it, 0: keep W~ as it is)."""
        layer = self.layer
        current = self.dequantized()
        outcome = v_step_codes(layer.weight_groups(self.buffer.detach()), layer.codes, self.scales16(),
                               self.grid, self.signs, layer.group_size,
                               max_code_change_per_step=max_code_change_per_step, code_trust_ratio=code_trust_ratio,
                               weight_norm=float(current.norm()), select=select)
        if outcome.changed:
            layer.codes.copy_(outcome.codes)
            self.unit = self._unit(layer.codes)
        if delta_decay:
            self.buffer.lerp_(self.dequantized(), delta_decay)
        return outcome

    @torch.no_grad()
    def commit(self) -> None:
        """Write the current scales (fp16) into the HiggsLinear; its codes are already current."""
        self.layer.scales.copy_(self.scales16())
        self.layer.clear_cache()

    @torch.no_grad()
    def load_state(self, codes: torch.Tensor, scale: torch.Tensor, buffer: torch.Tensor | None) -> None:
        """Restore from a checkpoint: codes into the HiggsLinear, the fp32 master scales, W~."""
        self.layer.codes.copy_(codes)
        self.scale.copy_(scale)
        self.unit = self._unit(self.layer.codes)
        if self.buffer is not None:
            self.buffer.copy_(buffer)
        self.commit()


def check_layer_valid(name: str, layer: HiggsLinear, codes_shape: torch.Size) -> None:
    """Raise ValueError unless the layer is still a valid HIGGS layer: scales finite and non-negative fp16 (what
    load_quantized requires), codes uint8 of their original shape (every bit pattern of a 2**code_bits grid is a
    valid index, so shape and dtype are all there is to check)."""
    s = layer.scales
    if s.dtype != torch.float16 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"pv_tune: layer {name!r} ended with non-finite or negative scales")
    if layer.codes.dtype != torch.uint8 or layer.codes.shape != codes_shape:
        raise ValueError(f"pv_tune: layer {name!r} has codes of {layer.codes.dtype} {tuple(layer.codes.shape)}, "
                         f"expected uint8 {tuple(codes_shape)}")


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The RMSNorm weights (modules whose class name ends in RMSNorm), by parameter name."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)}


def train_mode(student: nn.Module, activation_checkpointing: bool) -> None:
    """Eval mode (no dropout) unless activation checkpointing, which transformers runs only in train mode; then
    every dropout module is put back in eval mode, so both settings compute the same loss."""
    if not activation_checkpointing:
        student.eval()
        return
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.eval()


class swapped:
    """Within the block the student's HiggsLinear layers are replaced by their TunedHiggsLinear stand-ins."""

    def __init__(self, student: nn.Module, tuned: dict, layers: dict):
        self.student, self.tuned, self.layers = student, tuned, layers

    def __enter__(self):
        for name, t in self.tuned.items():
            set_submodule(self.student, name, t)

    def __exit__(self, *exc):
        for name, m in self.layers.items():
            set_submodule(self.student, name, m)


class swapped_back(swapped):
    """The opposite, inside a `swapped` block: the HiggsLinear layers (the stored truth) serve, e.g. to evaluate."""

    def __enter__(self):
        super().__exit__()

    def __exit__(self, *exc):
        super().__enter__()
