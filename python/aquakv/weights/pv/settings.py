"""The settings and the result of a PV-Tuning run (pv_tune in aquakv.weights.pv.tune)."""
from __future__ import annotations

from dataclasses import dataclass, field

from aquakv.weights.pv.guard import GUARD_WINDOWS

METHODS = ("pv", "ste", "p-only")
CODE_LR_PER_NAT = 1.5e-3  # see docs/pv_tuning.md, "Defaults": the best fixed code_lr of three starts / their KL
LOSS_MEMORY = 5  # the code step follows the mean training KL of this many steps (the current one included)


@dataclass(frozen=True)
class PVTuneConfig:
    """The settings that shape a run's trajectory (a checkpoint refuses to resume under others)."""

    method: str = "pv"
    batch_size: int = 2
    window: int = 256
    lr: float = 1e-3
    code_lr: float | None = None
    code_lr_per_nat: float = CODE_LR_PER_NAT
    max_code_change_per_step: float = 0.01
    code_trust_ratio: float = 0.1
    delta_decay: float = 0.0
    seed: int = 0
    tune_norms: bool = False
    loss_chunk: int = 256
    validate_every: int | None = 5
    validation_windows: int = GUARD_WINDOWS
    stop_rise: float = 0.25
    backoff: float = 0.5
    keep_best: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"pv_tune: method must be one of {METHODS}, got {self.method!r}")
        for name in ("batch_size", "window", "loss_chunk", "validate_every", "validation_windows"):
            value, low = getattr(self, name), 2 if name == "window" else 1
            if value is None and name == "validate_every":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"pv_tune: {name} must be an integer >= {low}, got {value!r}")
        for name, low, high in (("lr", 0, None), ("code_lr", 0, None), ("code_lr_per_nat", 0, None),
                                ("max_code_change_per_step", 0, 1), ("code_trust_ratio", 0, None),
                                ("delta_decay", 0, 1), ("stop_rise", 0, None), ("backoff", 0, 1)):
            value = getattr(self, name)
            if value is None and name == "code_lr":
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            ok = ok and value >= low and (high is None or value <= high) and value != float("inf")
            positive = name in ("max_code_change_per_step", "code_trust_ratio", "code_lr_per_nat", "backoff")
            if not ok or (positive and value == 0):
                span = f"in (0, {high}]" if positive and high is not None else (
                    f"in [0, {high}]" if high is not None else ("> 0" if positive else ">= 0"))
                raise ValueError(f"pv_tune: {name} must be a finite number {span}, got {value!r}")


@dataclass
class PVTuneResult:
    """What a run did. loss[i], codes_changed[i] and code_lr[i] belong to step i + 1 (codes_changed summed over
    layers; code_lr: the V step's Adam rate that step); eval_steps/eval_ppl: the eval_data perplexity after that
    many steps (0: the start). val_steps/val_ppl: the guard's validation perplexity; val_start: the model passed
    in, val_final: the model returned (the best state unless keep_best=False), best_step: the step it is from;
    stopped: why the run ended early (None: it ran all its steps). tokens: training tokens the student saw;
    seconds: wall time over all sessions of the run (resumes add)."""

    method: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    codes_changed: list[int] = field(default_factory=list)
    code_lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_ppl: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_ppl: list[float] = field(default_factory=list)
    val_start: float | None = None
    val_final: float | None = None
    best_step: int | None = None
    stopped: str | None = None
    n_codes: int = 0
    resumed_from: int | None = None
