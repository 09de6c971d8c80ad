"""PV-Tuning: fine-tune a HIGGS-quantized student against its unquantized teacher by alternating a continuous
(P) step on the scales and a discrete (V) step on the codes (Malinovskii et al., 2024; docs/pv_tuning.md).

    student = quantize_model(copy.deepcopy(model), bits=2)
    result = pv_tune(student, model, ids, steps=40, batch_size=2, window=256, eval_data=held_out, eval_every=10)
    save_quantized(student, "pv2")          # the quantize-weights format: codes and fp16 scales

One step: the KL loss is accumulated over `batch_size` windows (one backward each); Adam updates the fp32
master scales (lr); for "pv" and "ste" a second Adam (code_lr, betas (0, 0.95)) moves the straight-through
buffers W~, and the V step re-encodes codes from them (pv.step.v_step_codes); codes and scales are then written
into the HiggsLinear layers, which stay the stored truth throughout.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Sequence

import torch
from torch import nn

from aquakv.evaluation.windows import cut_windows
from aquakv.progress import progress as progress_bar
from aquakv.weights.checkpoint import TUNED_NORMS_ATTR
from aquakv.weights.pv.checkpoint import (
    check_compatible,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from aquakv.weights.pv.data import BatchSchedule, as_windows, eval_ids
from aquakv.weights.compare import windows_perplexity
from aquakv.weights.pv.guard import GUARD_WINDOWS, ValidationGuard, split_validation
from aquakv.weights.pv.layer import (
    TunedHiggsLinear,
    check_layer_valid,
    norm_weights,
    swapped,
    swapped_back,
    train_mode,
)
from aquakv.weights.pv.loss import check_head_matches, kl_window_loss
from aquakv.weights.pv.settings import CODE_LR_PER_NAT, LOSS_MEMORY, METHODS, PVTuneConfig, PVTuneResult
from aquakv.weights.quantize import higgs_layers

log = logging.getLogger(__name__)

def pv_tune(student: nn.Module, teacher: nn.Module, data, *, tokenizer=None, steps: int, batch_size: int = 2,
            window: int = 256, lr: float = 1e-3, code_lr: float | None = None,
            code_lr_per_nat: float = CODE_LR_PER_NAT, max_code_change_per_step: float = 0.01,
            code_trust_ratio: float = 0.1, method: str = "pv", seed: int = 0, device: str | torch.device | None = None,
            validation=None, validate_every: int | None = 5, validation_windows: int = GUARD_WINDOWS,
            stop_rise: float = 0.25, backoff: float = 0.5, keep_best: bool = True,
            eval_data=None, eval_every: int | None = None, eval_window: int | None = None,
            eval_windows: int | None = None, checkpoint_dir=None, checkpoint_every: int | None = None,
            resume: bool = False, delta_decay: float = 0.0, tune_norms: bool = False,
            activation_checkpointing: bool = False, loss_chunk: int = 256, progress: bool = True) -> PVTuneResult:
    """Tune `student` (a model with HiggsLinear layers, from quantize_model or load_quantized) in place.

    teacher: the unquantized model, frozen, on any device. data: token ids (1-D LongTensor or a list of them) or
    texts (str or list of str, with `tokenizer`), cut into windows of `window` tokens; each step draws
    `batch_size` of them in a seeded order that reshuffles every epoch. method: "pv" (PV-Tuning), "ste" (every
    code re-encoded from W~ every step, W~ never reset), "p-only" (scales only).
    code_lr: a fixed Adam rate on W~; None (the default) makes it follow the training loss: code_lr_per_nat x the
    mean KL of the last 5 steps, so a broken 2-bit start takes large code steps and a good 3-bit start small ones.
    The guard (validate_every steps; None: off): the student's perplexity on `validation` (ids or texts; default
    the last `validation_windows` training windows, never trained on) at the start, every validate_every steps and
    at the end; each validation worse than the best multiplies the code step by `backoff`; a rise past
    (1 + stop_rise) x the best stops the run with a warning; the best state is returned (keep_best=False: the last).
    delta_decay: after a PV V step, W~ moves this fraction of the way to the new dequantized weight (0 keeps it,
    1 resets it). tune_norms: the RMSNorm weights join the P step; the student then names them in
    `student.aquakv_tuned_norms`, and save_quantized stores them with the layers (load_quantized restores them).
    eval_data (ids or texts): a perplexity curve to report, at the start, every eval_every steps and at the end
    (windows of eval_window tokens, default window; at most eval_windows). checkpoint_dir + checkpoint_every: an
    atomic checkpoint every N steps and at the end; resume=True continues from the one in checkpoint_dir (refused
    if its settings differ). device: where the student trains (moved there); None keeps it where it is.
    """
    config = PVTuneConfig(method=method, batch_size=batch_size, window=window, lr=lr, code_lr=code_lr,
                          code_lr_per_nat=code_lr_per_nat, max_code_change_per_step=max_code_change_per_step,
                          code_trust_ratio=code_trust_ratio, delta_decay=delta_decay, seed=seed, tune_norms=tune_norms,
                          loss_chunk=loss_chunk, validate_every=validate_every, validation_windows=validation_windows,
                          stop_rise=stop_rise, backoff=backoff, keep_best=keep_best)
    for name, value in (("steps", steps), ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1)):
            raise ValueError(f"pv_tune: {name} must be a positive integer, got {value!r}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("pv_tune: checkpoint_every needs checkpoint_dir")
    if validation is not None and validate_every is None:
        raise ValueError("pv_tune: validation= is the guard's set; it needs validate_every (the guard is off)")
    layers = higgs_layers(student)
    if not layers:
        raise ValueError("pv_tune: the student has no HiggsLinear layer (quantize it with quantize_model first)")
    if device is not None:
        student.to(device)
    s_device = next(iter(layers.values())).codes.device
    windows = as_windows(data, tokenizer, window, "data")
    guard = None
    if validate_every is not None:
        if validation is None:
            windows, held = split_validation(windows, validation_windows)
        else:
            held = as_windows(validation, tokenizer, window, "validation")
        guard = ValidationGuard(held, every=validate_every, stop_rise=stop_rise, backoff=backoff, keep_best=keep_best)
    held_out = eval_ids(eval_data, tokenizer) if eval_data is not None else None
    if held_out is not None:
        eval_windows_ids = torch.stack(cut_windows(held_out, eval_window or window, keep_tail=False,
                                                   max_windows=eval_windows))
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
    norms = norm_weights(student) if tune_norms else {}
    if norms:  # save_quantized stores the parameters named here along with the layers (weights/checkpoint.py)
        marked = set(getattr(student, TUNED_NORMS_ATTR, None) or ())
        setattr(student, TUNED_NORMS_ATTR, tuple(sorted(marked | set(norms))))
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    for p in norms.values():
        p.requires_grad_(True)
    p_opt = torch.optim.Adam([t.scale for t in tuned.values()] + list(norms.values()), lr=lr)
    # One W~ at a time (foreach=False): the multi-tensor path allocates temporaries for every W~ at once.
    v_opt = (torch.optim.Adam([t.buffer for t in tuned.values()], lr=code_lr or 0.0, betas=(0.0, 0.95), foreach=False)
             if method != "p-only" else None)
    result = PVTuneResult(method=method, n_codes=sum(t.unit.numel() // t.layer.dim for t in tuned.values()))
    if state is not None:
        _restore(state, tuned, norms, p_opt, v_opt, result, guard)
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
                    history=dict(loss=result.loss, codes_changed=result.codes_changed, code_lr=result.code_lr,
                                 eval_steps=result.eval_steps, eval_ppl=result.eval_ppl, stopped=result.stopped),
                    guard=None if guard is None else guard.state_dict(),
                    seconds=time.perf_counter() - t0, rng=torch.get_rng_state())

    def best_state() -> dict:  # what the model returned is made of: codes, master scales, tuned norms
        return dict(layers={n: dict(codes=t.layer.codes.clone(), scale=t.scale.detach().clone())
                            for n, t in tuned.items()}, norms={n: p.detach().clone() for n, p in norms.items()})

    def evaluate() -> None:
        student.eval()
        ppl = windows_perplexity(student, eval_windows_ids, desc="pv-tune held-out", progress=False).ppl
        result.eval_steps.append(result.steps)
        result.eval_ppl.append(ppl)
        log.info("pv_tune: step %d held-out perplexity %.4f", result.steps, ppl)

    def validate() -> None:
        student.eval()
        decision = guard.observe(result.steps, guard.measure(student), best_state)
        log.info("pv_tune: step %d validation perplexity %.4f%s", result.steps, decision.ppl,
                 " (best)" if decision.improved else f" (best {guard.best_ppl:.4f} at step {guard.best_step})")
        if decision.stop:
            result.stopped = decision.stop
            log.warning("pv_tune: stopped early: %s; returning the state of step %s", decision.stop,
                        guard.best_step if keep_best else result.steps)

    def code_rate(loss: float) -> float:  # the V step's Adam rate this step
        rate = code_lr if code_lr is not None else code_lr_per_nat * (
            (sum(result.loss[-(LOSS_MEMORY - 1):]) + loss) / (len(result.loss[-(LOSS_MEMORY - 1):]) + 1))
        return rate * (guard.step_scale() if guard is not None else 1.0)

    try:
        student.eval()
        if held_out is not None and result.steps == 0 and not result.eval_steps:
            evaluate()
        if guard is not None and not guard.steps:
            validate()
        with swapped(student, tuned, layers):
            train_mode(student, activation_checkpointing)
            bar = progress_bar(range(result.steps, steps), desc=f"pv-tune ({method})", enabled=progress, unit="step")
            for step in bar:
                if result.stopped:
                    break
                loss, changed, rate = _one_step(student, teacher, windows[schedule.batch(step)].to(s_device), tuned,
                                                norms, p_opt, v_opt, config, code_rate)
                result.steps, result.tokens = step + 1, (step + 1) * batch_size * window
                result.loss.append(loss)
                result.codes_changed.append(changed)
                result.code_lr.append(rate)
                bar.set_postfix_str(f"loss={loss:.4f}, codes={changed}")
                if not math.isfinite(loss) and guard is not None:
                    result.stopped = f"training loss is {loss} at step {result.steps}"
                    log.warning("pv_tune: stopped early: %s", result.stopped)
                last = result.steps == steps or result.stopped is not None
                due_eval = held_out is not None and (last or (eval_every is not None and result.steps % eval_every == 0))
                due_val = guard is not None and not result.stopped and result.steps % guard.every == 0
                # An end off the guard's interval is validated after the checkpoint: a resumed run must not see it.
                end_val = guard is not None and not result.stopped and last and not due_val
                if due_eval or due_val:
                    with swapped_back(student, tuned, layers):
                        if due_val:
                            validate()
                        if held_out is not None and (due_eval or result.stopped):
                            evaluate()
                    train_mode(student, activation_checkpointing)
                result.seconds = time.perf_counter() - t0
                if checkpoint_dir is not None and (last or result.stopped or (
                        checkpoint_every is not None and result.steps % checkpoint_every == 0)):
                    save_checkpoint(checkpoint_dir, snapshot())
                if end_val:
                    with swapped_back(student, tuned, layers):
                        validate()
            bar.close()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        if activation_checkpointing and hasattr(student, "gradient_checkpointing_disable"):
            student.gradient_checkpointing_disable()
        student.train(was_training)
    if guard is not None:
        result.val_steps, result.val_ppl = list(guard.steps), list(guard.ppl)
        result.val_start = guard.ppl[0]
        if keep_best and guard.best_step is not None and guard.best_step != guard.steps[-1]:
            _load_best(guard.best_state, tuned, norms)
            log.info("pv_tune: returning the state of step %d (validation perplexity %.4f, last %.4f)",
                     guard.best_step, guard.best_ppl, guard.ppl[-1])
        result.best_step = guard.best_step if keep_best else guard.steps[-1]
        result.val_final = guard.best_ppl if keep_best else guard.ppl[-1]
    for name, m in layers.items():
        check_layer_valid(name, m, codes_shapes[name])
    result.seconds = time.perf_counter() - t0
    return result


def _one_step(student, teacher, batch: torch.Tensor, tuned: dict[str, TunedHiggsLinear], norms: dict,
              p_opt: torch.optim.Optimizer, v_opt: torch.optim.Optimizer | None, config: PVTuneConfig, code_rate
              ) -> tuple[float, int, float]:
    """Gradients over the batch (one window per backward), then the P step and the V step at the rate
    code_rate(loss). Returns (mean loss, codes changed, the V step's rate; 0 without one)."""
    p_opt.zero_grad(set_to_none=True)
    if v_opt is not None:
        v_opt.zero_grad(set_to_none=True)
    total = 0.0
    for ids in batch:
        loss = kl_window_loss(student, teacher, ids[None], chunk=config.loss_chunk) / len(batch)
        loss.backward()
        total += float(loss.detach())
    if not math.isfinite(total):  # a NaN step would poison every scale; the guard stops the run
        return total, 0, 0.0
    p_opt.step()
    changed, rate = 0, 0.0
    for t in tuned.values():
        t.clamp_scales()
    if v_opt is not None:
        rate = code_rate(total)
        for group in v_opt.param_groups:
            group["lr"] = rate
        v_opt.step()
        for t in tuned.values():
            outcome = t.v_step(select=config.method == "pv", max_code_change_per_step=config.max_code_change_per_step,
                               code_trust_ratio=config.code_trust_ratio,
                               delta_decay=config.delta_decay if config.method == "pv" else 0.0)
            changed += outcome.changed
    for t in tuned.values():
        t.commit()
    return total, changed, rate


def _load_best(best: dict, tuned: dict[str, TunedHiggsLinear], norms: dict) -> None:
    """Write the kept best state into the HiggsLinear layers (codes, fp16 scales) and the tuned norms."""
    with torch.no_grad():
        for name, t in tuned.items():
            entry = best["layers"][name]
            t.layer.codes.copy_(entry["codes"].to(t.layer.codes.device))
            t.scale.copy_(entry["scale"].to(t.scale.device))
            t.commit()
        for name, p in norms.items():
            p.copy_(best["norms"][name])


def _restore(state: dict, tuned: dict[str, TunedHiggsLinear], norms: dict, p_opt, v_opt, result: PVTuneResult,
             guard: ValidationGuard | None) -> None:
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
    result.code_lr, result.stopped = list(history["code_lr"]), history["stopped"]
    result.eval_steps, result.eval_ppl = list(history["eval_steps"]), list(history["eval_ppl"])
    if guard is not None and state["guard"] is not None:
        guard.load_state_dict(state["guard"])
    result.steps = result.resumed_from = int(state["step"])
    result.tokens = result.steps * state["config"]["batch_size"] * state["config"]["window"]
    result.seconds = float(state["seconds"])
    torch.set_rng_state(state["rng"])


__all__: Sequence[str] = ("METHODS", "PVTuneConfig", "PVTuneResult", "pv_tune")
