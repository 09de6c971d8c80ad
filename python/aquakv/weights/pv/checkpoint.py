"""PV-Tuning checkpoints: everything a run needs to continue exactly as if it had never stopped, in one file
written atomically (aquakv.atomic_writes), so an interrupted write leaves the previous checkpoint whole.

    DIR/pv_checkpoint.pt   torch.save of {format, format_version, config, step, layers: {name: {codes, scale,
                           buffer}}, norms, p_optimizer, v_optimizer, history, guard,
                           seconds, rng}

`config` holds the settings that shape the trajectory (method, learning rates, seed, batch, window, ...); a
resume with different ones is refused, since it would not be the same run. The number of steps may grow.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from aquakv.atomic_writes import atomic_path

FORMAT = "aquakv-pv-checkpoint"
FORMAT_VERSION = 2  # 2: the validation guard's history and best state
CHECKPOINT_FILE = "pv_checkpoint.pt"
_KEYS = ("format", "format_version", "config", "step", "layers", "norms", "p_optimizer", "v_optimizer", "history",
         "guard", "seconds", "rng")


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / CHECKPOINT_FILE


def save_checkpoint(directory: str | os.PathLike, state: dict) -> Path:
    """Write `state` (the keys above but format/format_version) to DIR/pv_checkpoint.pt atomically; DIR is
    created if needed. Tensors are copied to the CPU first, so the file loads on any machine."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **_to_cpu(state)}
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise ValueError(f"save_checkpoint: state lacks {missing}")
    path = checkpoint_path(directory)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict:
    """Read DIR/pv_checkpoint.pt (tensors only, no pickled code: weights_only) and check its format; raises
    FileNotFoundError when absent and ValueError naming the file when it is not a PV-Tuning checkpoint."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch's own error says why
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: {missing[0]}: missing")
    return state


def check_compatible(directory: str | os.PathLike, state: dict, config: dict, layers: dict) -> None:
    """Refuse a checkpoint of another run: other settings, or layers that differ in names or code shapes.
    layers: {name: codes tensor} of the student being resumed."""
    path = checkpoint_path(directory)
    stored = state["config"]
    differ = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
    if differ:
        k = differ[0]
        raise ValueError(f"{path}: written with {k}={stored.get(k)!r}, this run has {k}={config.get(k)!r}; "
                         f"resume with the same settings or use another checkpoint directory")
    if set(state["layers"]) != set(layers):
        extra = sorted(set(state["layers"]) ^ set(layers))
        raise ValueError(f"{path}: layer {extra[0]!r} is in only one of the checkpoint and the model")
    for name, codes in layers.items():
        stored_codes = state["layers"][name]["codes"]
        if stored_codes.shape != codes.shape or stored_codes.dtype != codes.dtype:
            raise ValueError(f"{path}: layer {name!r}: codes are {tuple(stored_codes.shape)} {stored_codes.dtype} in "
                             f"the checkpoint, {tuple(codes.shape)} {codes.dtype} in the model")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
