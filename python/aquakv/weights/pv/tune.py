"""PV-Tuning: fine-tune a HIGGS-quantized student against its unquantized teacher by alternating a continuous
(P) step on the scales and a discrete (V) step on the codes (Malinovskii et al., 2024; docs/pv_tuning.md).

    student = quantize_model(copy.deepcopy(model), bits=2)
    result = pv_tune(student, model, ids, steps=40, batch_size=2, window=256, eval_data=held_out, eval_every=10)
    save_quantized(student, "pv2")          # the quantize-weights format: codes and fp16 scales

One step: the KL loss is accumulated over `batch_size` windows (one backward each); Adam updates the fp32
master scales (lr); for "pv" and "ste" a second Adam (code_lr, betas (0, 0.95)) moves the straight-through
buffers W~, and the V step re-encodes codes from them (pv_step.v_step_codes); codes and scales are then written
into the HiggsLinear layers, which stay the stored truth throughout.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from aquakv.weights.pv_checkpoint import (
    check_compatible,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from aquakv.weights.pv_data import BatchSchedule, as_windows, eval_ids
from aquakv.weights.files import TUNED_NORMS_ATTR
from aquakv.weights.pv_layer import TunedHiggsLinear, check_layer_valid
from aquakv.weights.pv_loss import check_head_matches, kl_window_loss
from aquakv.weights.quantize import _set_submodule, higgs_layers

log = logging.getLogger(__name__)

METHODS = ("pv", "ste", "p-only")


@dataclass(frozen=True)
class PVTuneConfig:
    """The settings that shape a run's trajectory (a checkpoint refuses to resume under others)."""

    method: str = "pv"
    batch_size: int = 2
    window: int = 256
    lr: float = 1e-3
    code_lr: float = 1e-2
    max_code_change_per_step: float = 0.01
    code_trust_ratio: float = 0.1
    delta_decay: float = 0.0
    seed: int = 0
    tune_norms: bool = False
    loss_chunk: int = 256

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"pv_tune: method must be one of {METHODS}, got {self.method!r}")
        for name in ("batch_size", "window", "loss_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "window" else 1):
                raise ValueError(f"pv_tune: {name} must be an integer >= {2 if name == 'window' else 1}, got {value!r}")
        for name, low, high in (("lr", 0, None), ("code_lr", 0, None), ("max_code_change_per_step", 0, 1),
                                ("code_trust_ratio", 0, None), ("delta_decay", 0, 1)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            ok = ok and value >= low and (high is None or value <= high) and value != float("inf")
            if not ok or (name in ("max_code_change_per_step", "code_trust_ratio") and value == 0):
                span = f"in (0, {high}]" if name == "max_code_change_per_step" else (
                    f"in [0, {high}]" if high is not None else ("> 0" if name == "code_trust_ratio" else ">= 0"))
                raise ValueError(f"pv_tune: {name} must be a finite number {span}, got {value!r}")


@dataclass
class PVTuneResult:
    """What a run did. loss[i] and codes_changed[i] belong to step i + 1 (codes_changed summed over layers);
    eval_steps/eval_ppl: held-out perplexity after that many steps (0: the start). tokens: training tokens the
    student saw (steps * batch_size * window); seconds: wall time over all sessions of the run (resumes add)."""

    method: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    codes_changed: list[int] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_ppl: list[float] = field(default_factory=list)
    n_codes: int = 0
    resumed_from: int | None = None


def pv_tune(student: nn.Module, teacher: nn.Module, data, *, tokenizer=None, steps: int, batch_size: int = 2,
            window: int = 256, lr: float = 1e-3, code_lr: float = 1e-2, max_code_change_per_step: float = 0.01,
            code_trust_ratio: float = 0.1, method: str = "pv", seed: int = 0, device: str | torch.device | None = None,
            eval_data=None, eval_every: int | None = None, eval_window: int | None = None,
            eval_windows: int | None = None, checkpoint_dir=None, checkpoint_every: int | None = None,
            resume: bool = False, delta_decay: float = 0.0, tune_norms: bool = False,
            activation_checkpointing: bool = False, loss_chunk: int = 256, progress: bool = True) -> PVTuneResult:
    """Tune `student` (a model with HiggsLinear layers, from quantize_model or load_quantized) in place.

    teacher: the unquantized model, frozen, on any device. data: token ids (1-D LongTensor or a list of them) or
    texts (str or list of str, with `tokenizer`), cut into windows of `window` tokens; each step draws
    `batch_size` of them in a seeded order that reshuffles every epoch. method: "pv" (PV-Tuning), "ste" (every
    code re-encoded from W~ every step, W~ never reset), "p-only" (scales only). delta_decay: after a PV V step,
    W~ moves this fraction of the way to the new dequantized weight (0 keeps it, 1 resets it). tune_norms: the
    RMSNorm weights join the P step; the student then names them in `student.aquakv_tuned_norms`, and
    save_quantized stores them with the layers (load_quantized restores them).
    eval_data (ids or texts): held-out perplexity at the start, every eval_every steps and at the end (windows of
    eval_window tokens, default window; at most eval_windows). checkpoint_dir + checkpoint_every: an atomic
    checkpoint every N steps and at the end; resume=True continues from the one in checkpoint_dir (refused if its
    settings differ). device: where the student trains (moved there); None keeps it where it is.
    """
    config = PVTuneConfig(method=method, batch_size=batch_size, window=window, lr=lr, code_lr=code_lr,
                          max_code_change_per_step=max_code_change_per_step, code_trust_ratio=code_trust_ratio,
                          delta_decay=delta_decay, seed=seed, tune_norms=tune_norms, loss_chunk=loss_chunk)
    for name, value in (("steps", steps), ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1)):
            raise ValueError(f"pv_tune: {name} must be a positive integer, got {value!r}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("pv_tune: checkpoint_every needs checkpoint_dir")
    layers = higgs_layers(student)
    if not layers:
        raise ValueError("pv_tune: the student has no HiggsLinear layer (quantize it with quantize_model first)")
    if device is not None:
        student.to(device)
    s_device = next(iter(layers.values())).codes.device
    windows = as_windows(data, tokenizer, window, "data")
    held_out = eval_ids(eval_data, tokenizer) if eval_data is not None else None
    check_head_matches(teacher, windows[:1].to(next(teacher.parameters()).device))
    state = None
    if checkpoint_dir is not None and checkpoint_path(checkpoint_dir).is_file():
        if not resume:
            raise ValueError(f"pv_tune: {checkpoint_path(checkpoint_dir)} exists; pass resume=True to continue that "
                             f"run, or choose another checkpoint_dir")
        state = load_checkpoint(checkpoint_dir)
        check_compatible(checkpoint_dir, state, dataclasses.asdict(config), {n: m.codes for n, m in layers.items()})

    tuned = {name: TunedHiggsLinear(m, with_buffer=method != "p-only") for name, m in layers.items()}
    codes_shapes = {name: m.codes.shape for name, m in layers.items()}
    norms = _norm_weights(student) if tune_norms else {}
    if norms:  # save_quantized stores the parameters named here along with the layers (weights/files.py)
        marked = set(getattr(student, TUNED_NORMS_ATTR, None) or ())
        setattr(student, TUNED_NORMS_ATTR, tuple(sorted(marked | set(norms))))
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    for p in norms.values():
        p.requires_grad_(True)
    p_opt = torch.optim.Adam([t.scale for t in tuned.values()] + list(norms.values()), lr=lr)
    v_opt = (torch.optim.Adam([t.buffer for t in tuned.values()], lr=code_lr, betas=(0.0, 0.95))
             if method != "p-only" else None)
    result = PVTuneResult(method=method, n_codes=sum(t.unit.numel() // t.layer.dim for t in tuned.values()))
    if state is not None:
        _restore(state, tuned, norms, p_opt, v_opt, result)
        log.info("pv_tune: resumed from step %d of %s", result.steps, checkpoint_path(checkpoint_dir))
    schedule = BatchSchedule(len(windows), batch_size, seed)
    was_training = student.training
    t0 = time.perf_counter() - result.seconds

    def snapshot() -> dict:
        return dict(config=dataclasses.asdict(config), step=result.steps,
                    layers={n: dict(codes=t.layer.codes, scale=t.scale.detach(),
                                    buffer=None if t.buffer is None else t.buffer.detach()) for n, t in tuned.items()},
                    norms={n: p.detach() for n, p in norms.items()}, p_optimizer=p_opt.state_dict(),
                    v_optimizer=None if v_opt is None else v_opt.state_dict(),
                    history=dict(loss=result.loss, codes_changed=result.codes_changed, eval_steps=result.eval_steps,
                                 eval_ppl=result.eval_ppl),
                    seconds=time.perf_counter() - t0, rng=torch.get_rng_state())

    def evaluate() -> None:
        from aquakv.evaluation.perplexity import evaluate_perplexity

        student.eval()
        res = evaluate_perplexity(student, held_out.to(s_device), window=eval_window or window, step=None,
                                  max_windows=eval_windows, progress=False, desc=f"pv-tune step {result.steps}")
        result.eval_steps.append(result.steps)
        result.eval_ppl.append(res.ppl)
        log.info("pv_tune: step %d held-out perplexity %.4f", result.steps, res.ppl)

    try:
        if held_out is not None and result.steps == 0 and not result.eval_steps:
            evaluate()
        with _swapped(student, tuned, layers):
            _train_mode(student, activation_checkpointing)
            bar = tqdm(range(result.steps, steps), desc=f"pv-tune ({method})", disable=not progress, unit="step")
            for step in bar:
                loss, changed = _one_step(student, teacher, windows[schedule.batch(step)].to(s_device), tuned, norms,
                                          p_opt, v_opt, config)
                result.steps, result.tokens = step + 1, (step + 1) * batch_size * window
                result.loss.append(loss)
                result.codes_changed.append(changed)
                bar.set_postfix(loss=f"{loss:.4f}", codes=changed)
                due_eval = eval_every is not None and result.steps % eval_every == 0
                if held_out is not None and (due_eval or result.steps == steps):
                    with _swapped_back(student, tuned, layers):
                        evaluate()
                    _train_mode(student, activation_checkpointing)
                result.seconds = time.perf_counter() - t0
                if checkpoint_dir is not None and (result.steps == steps or (
                        checkpoint_every is not None and result.steps % checkpoint_every == 0)):
                    save_checkpoint(checkpoint_dir, snapshot())
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        if activation_checkpointing and hasattr(student, "gradient_checkpointing_disable"):
            student.gradient_checkpointing_disable()
        student.train(was_training)
    for name, m in layers.items():
        check_layer_valid(name, m, codes_shapes[name])
    result.seconds = time.perf_counter() - t0
    return result


def _one_step(student, teacher, batch: torch.Tensor, tuned: dict[str, TunedHiggsLinear], norms: dict,
              p_opt: torch.optim.Optimizer, v_opt: torch.optim.Optimizer | None, config: PVTuneConfig
              ) -> tuple[float, int]:
    """Gradients over the batch (one window per backward), then the P step and the V step. Returns (mean loss,
    codes changed)."""
    p_opt.zero_grad(set_to_none=True)
    if v_opt is not None:
        v_opt.zero_grad(set_to_none=True)
    total = 0.0
    for ids in batch:
        loss = kl_window_loss(student, teacher, ids[None], chunk=config.loss_chunk) / len(batch)
        loss.backward()
        total += float(loss.detach())
    p_opt.step()
    changed = 0
    for t in tuned.values():
        t.clamp_scales()
    if v_opt is not None:
        v_opt.step()
        for t in tuned.values():
            outcome = t.v_step(select=config.method == "pv", max_code_change_per_step=config.max_code_change_per_step,
                               code_trust_ratio=config.code_trust_ratio,
                               delta_decay=config.delta_decay if config.method == "pv" else 0.0)
            changed += outcome.changed
    for t in tuned.values():
        t.commit()
    return total, changed


def _restore(state: dict, tuned: dict[str, TunedHiggsLinear], norms: dict, p_opt, v_opt, result: PVTuneResult) -> None:
    for name, t in tuned.items():
        entry = state["layers"][name]
        dev = t.layer.codes.device
        t.load_state(entry["codes"].to(dev), entry["scale"].to(dev),
                     None if entry["buffer"] is None else entry["buffer"].to(dev))
    with torch.no_grad():
        for name, p in norms.items():
            p.copy_(state["norms"][name])
    p_opt.load_state_dict(state["p_optimizer"])
    if v_opt is not None:
        v_opt.load_state_dict(state["v_optimizer"])
    history = state["history"]
    result.loss, result.codes_changed = list(history["loss"]), list(history["codes_changed"])
    result.eval_steps, result.eval_ppl = list(history["eval_steps"]), list(history["eval_ppl"])
    result.steps = result.resumed_from = int(state["step"])
    result.tokens = result.steps * state["config"]["batch_size"] * state["config"]["window"]
    result.seconds = float(state["seconds"])
    torch.set_rng_state(state["rng"])


def _norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The RMSNorm weights (modules whose class name ends in RMSNorm), by parameter name."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)}


def _train_mode(student: nn.Module, activation_checkpointing: bool) -> None:
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


class _swapped:
    """Within the block the student's HiggsLinear layers are replaced by their TunedHiggsLinear stand-ins."""

    def __init__(self, student: nn.Module, tuned: dict, layers: dict):
        self.student, self.tuned, self.layers = student, tuned, layers

    def __enter__(self):
        for name, t in self.tuned.items():
            _set_submodule(self.student, name, t)

    def __exit__(self, *exc):
        for name, m in self.layers.items():
            _set_submodule(self.student, name, m)


class _swapped_back(_swapped):
    """The opposite, inside a _swapped block: the HiggsLinear layers (the stored truth) serve, e.g. to evaluate."""

    def __enter__(self):
        super().__exit__()

    def __exit__(self, *exc):
        super().__enter__()


__all__: Sequence[str] = ("METHODS", "PVTuneConfig", "PVTuneResult", "pv_tune")
