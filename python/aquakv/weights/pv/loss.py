"""The PV-Tuning loss: token-level KL(teacher || student) over a window, with memory bounded in the vocabulary.

The decoders run once each; the output head and the softmaxes then run over `chunk` tokens at a time under
activation checkpointing, so at most one [chunk, vocab] block of logits (teacher and student) is alive, in the
forward and again in the backward, instead of [window, vocab].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None:
        raise ValueError(f"pv_tune: {type(model).__name__} has no get_decoder() / get_output_embeddings(); "
                         f"PV-Tuning needs a decoder-only causal LM")
    return decoder, head


def _chunk_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Module,
              teacher_head: nn.Module) -> torch.Tensor:
    """sum over the chunk's tokens of KL(p_t || p_s); hidden states [n, H], each on its model's device. Both heads
    run in here, so checkpointing keeps only the [n, H] inputs and recomputes the [n, V] logits in the backward."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1).to(student_hidden.device)
    student_logp = F.log_softmax(student_head(student_hidden).float(), dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")


def check_head_matches(model: nn.Module, ids: torch.Tensor) -> None:
    """The loss recomputes logits as head(decoder(ids)); refuse a model whose forward does more (logit scaling,
    soft-capping), since its KL would be of the wrong distribution. ids: [1, T] on the model's device."""
    decoder, head = _parts(model)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        mine = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    if not torch.allclose(full, mine, rtol=1e-4, atol=1e-4 * float(full.abs().max())):
        raise ValueError(f"pv_tune: {type(model).__name__}'s logits are not head(decoder(ids)) (max difference "
                         f"{float((full - mine).abs().max()):.3g}); models that scale or cap their logits are not "
                         f"supported")


def kl_window_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) for ids [B, T] on the student's device (every position, the last
    included: each one predicts a next token). Returns a differentiable float32 scalar on the student's device.

    The teacher runs under no_grad on its own device; its log-probabilities move to the student's device one
    chunk of `chunk` tokens at a time."""
    s_decoder, s_head = _parts(student)
    t_decoder, t_head = _parts(teacher)
    t_device = next(teacher.parameters()).device
    with torch.no_grad():
        t_hidden = t_decoder(input_ids=ids.to(t_device), use_cache=False).last_hidden_state
    s_hidden = s_decoder(input_ids=ids, use_cache=False).last_hidden_state
    s_flat, t_flat = s_hidden.flatten(0, 1), t_hidden.flatten(0, 1)
    total = s_flat.new_zeros((), dtype=torch.float32)
    for start in range(0, s_flat.shape[0], chunk):
        args = (s_flat[start: start + chunk], t_flat[start: start + chunk], s_head, t_head)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_kl, *args, use_reentrant=False)
        else:
            total = total + _chunk_kl(*args)
    return total / s_flat.shape[0]
