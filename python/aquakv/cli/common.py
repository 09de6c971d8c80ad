"""What every `aquakv` subcommand shares: options, user errors, device choice, model and text loading, quiet mode."""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("aquakv")


class UserError(Exception):
    """A problem with the command line or its inputs: reported in one line, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        metavar="DEV",
                        help="torch device: cpu, cuda, cuda:N, or auto (cuda when available, else cpu; default)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed: torch's RNG, and the HIGGS sign seed where something is calibrated (default 0)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (per-layer calibration report)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR",
                        help="local transformers checkpoint directory, or a directory holding --gguf "
                             "(default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf", metavar="FILE", help="GGUF file inside --model (dequantized to fp32 on load)")


def _text_option(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("--text", nargs="+", metavar="FILE",
                        help=f"UTF-8 text files, concatenated (default: the bundled {split} text, part of "
                             "Python's own reference documentation)")


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; refuses a CUDA device that is not there."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def _check_files(paths: Optional[Sequence[str]], what: str) -> None:
    for p in paths or ():
        if not Path(p).is_file():
            raise UserError(f"{what} not found: {p}")


def _check_model_args(args: argparse.Namespace) -> None:
    """Fail before the slow model load on paths that do not exist."""
    if args.model is not None and not Path(args.model).is_dir():
        raise UserError(f"--model directory not found: {args.model}")
    if args.gguf is not None:
        where = Path(args.model) / args.gguf if args.model is not None else None
        if where is not None and not where.is_file():
            raise UserError(f"--gguf file not found: {where}")


def load(args: argparse.Namespace):
    """(model, tokenizer) from --model/--gguf on --device; loading failures become UserError."""
    from aquakv.models import load_model

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(args.model, args.gguf, device=args.device)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load a causal language model from {args.model or 'the bundled SmolLM2'}: {first}") from None
    cfg = model.config
    log.info("model loaded in %.1f s (%s, %s layers)", time.perf_counter() - t0, getattr(cfg, "model_type", "?"),
             getattr(cfg, "num_hidden_layers", "?"))
    return model, tokenizer


def token_ids(tokenizer, files: Optional[Sequence[str]], split: str):
    """1-D LongTensor of the --text files (or the bundled text of `split`)."""
    from aquakv.data import default_texts, read_text_files, tokenize

    try:
        texts = read_text_files(files) if files else default_texts(split)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    return tokenize(tokenizer, texts)


@contextlib.contextmanager
def _bars_off(quiet: bool):
    """With -q, every tqdm bar defaults to disabled while the command runs: transformers' GGUF loader draws a plain
    tqdm bar that transformers' own switch does not reach."""
    if not quiet:
        yield
        return
    import tqdm

    init = vars(tqdm.tqdm)["__init__"]  # the raw class attribute (tqdm's own is a partialmethod descriptor)
    tqdm.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init


def _setup(args: argparse.Namespace) -> None:
    import torch

    logging.basicConfig(format="%(message)s")
    logging.getLogger("aquakv").setLevel(logging.WARNING if args.quiet and not args.verbose else logging.INFO)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    args.device = resolve_device(args.device)
    torch.manual_seed(args.seed)
