"""The validation guard of PV-Tuning: held-out perplexity at intervals, the best state kept, an early stop.

A run with a step size too large for its start (a code_lr tuned at 2 bits applied at 3 bits, say) used to return
a model worse than the data-free one it was given, and nothing said so. The guard measures the student's
perplexity on validation windows that the run never trains on (a held-out tail of its own training windows, or
the caller's set) at the start and every `every` steps, and

  - keeps a copy of the best state seen (codes, fp16 scales, tuned norms), the start included, so the model
    returned is never worse on the validation windows than the one passed in (keep_best=True);
  - halves the V step's size (`backoff`) after every validation that is worse than the best so far: the code
    step follows the measured loss down when it overshoots;
  - stops the run with a message when the perplexity rises past (1 + stop_rise) x the best, or is not finite.

Everything it decides is a function of the validation history, so a resumed run decides the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GUARD_WINDOWS = 4  # validation windows held out of the training data when the caller gives none


def split_validation(windows: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, validation windows): the last `count` windows of [N, T] (at most N // 4, at least 1)
    are held out. Raises ValueError when N < 2: nothing would be left to train on."""
    n = windows.shape[0]
    if n < 2:
        raise ValueError(f"pv_tune: the training data gives {n} window of {windows.shape[1]} tokens; the validation "
                         f"guard holds one out and needs at least 2 (pass validation=, more data, or "
                         f"validate_every=None to train without the guard)")
    k = max(1, min(count, n // 4))
    return windows[: n - k], windows[n - k:]


@dataclass
class GuardDecision:
    """What one validation decided. improved: a new best; stop: the message when the run must end."""

    ppl: float
    improved: bool
    stop: str | None


class ValidationGuard:
    """Held-out perplexity of the student on `windows` [K, T], the best state, and the stop rule."""

    def __init__(self, windows: torch.Tensor, *, every: int, stop_rise: float, backoff: float, keep_best: bool):
        self.windows, self.every, self.stop_rise, self.backoff, self.keep_best = windows, every, stop_rise, backoff, keep_best
        self.steps: list[int] = []
        self.ppl: list[float] = []
        self.best_step: int | None = None
        self.best_state: dict | None = None

    @property
    def best_ppl(self) -> float:
        return self.ppl[self.steps.index(self.best_step)] if self.best_step is not None else math.inf

    def step_scale(self) -> float:
        """The V step's multiplier: backoff ** (validations worse than the best before them)."""
        worse, best = 0, math.inf
        for p in self.ppl:
            if p < best:
                best = p
            else:
                worse += 1
        return self.backoff ** worse

    def measure(self, student: torch.nn.Module) -> float:
        """Perplexity of `student` (its HiggsLinear layers serving) on the validation windows, one forward each."""
        from aquakv.weights.compare import windows_perplexity

        return windows_perplexity(student, self.windows, desc="pv-tune validation", progress=False).ppl

    def observe(self, step: int, ppl: float, state) -> GuardDecision:
        """Record the validation perplexity after `step` steps; `state()` gives the state to keep when it is the
        best so far (called only then)."""
        improved = math.isfinite(ppl) and ppl < self.best_ppl
        self.steps.append(step)
        self.ppl.append(ppl)
        if improved:
            self.best_step, self.best_state = step, state()
            return GuardDecision(ppl, True, None)
        if not math.isfinite(ppl):
            return GuardDecision(ppl, False, f"validation perplexity is {ppl} after step {step}")
        if ppl > (1 + self.stop_rise) * self.best_ppl:
            return GuardDecision(ppl, False, f"validation perplexity rose to {ppl:.4g} after step {step}, past "
                                             f"{1 + self.stop_rise:g} x the best ({self.best_ppl:.4g} after step "
                                             f"{self.best_step})")
        return GuardDecision(ppl, False, None)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(steps=list(self.steps), ppl=list(self.ppl), best_step=self.best_step, best_state=self.best_state)

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.ppl = list(state["steps"]), list(state["ppl"])
        self.best_step, self.best_state = state["best_step"], state["best_state"]
