"""What every `aquakv` subcommand shares: options, user errors, checks before slow work, device choice, model and
text loading, quiet mode and progress bars.

Nothing here imports torch or transformers at module level: `aquakv --help` must answer at once.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("aquakv")


class Parser(argparse.ArgumentParser):
    """The parser of `aquakv` and (argparse hands its class down) of every subcommand. A usage error is one line
    and a pointer to --help, not the usage block: the block pushes the one line that matters off a small screen."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


class UserError(Exception):
    """A problem with the command line or its inputs: reported in one line, exit status 2."""


# ---- option types: argparse names the function in "invalid <name> value: 'x'", so they carry readable names ----
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _weight_widths() -> str:
    from aquakv.grids import bits_per_value_choices

    return ", ".join(f"{w:g}" for w in bits_per_value_choices())


def finite_positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value


def weight_bits(text: str) -> float:
    from aquakv.grids import bits_per_value_choices

    value = finite_positive(text)
    if not any(abs(value - w) < 1e-9 for w in bits_per_value_choices()):
        raise argparse.ArgumentTypeError(f"{text} is not a shipped HIGGS grid width (choose one of {_weight_widths()})")
    return value


def power_of_two(text: str) -> int:
    value = positive_int(text)
    if value < 2 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two >= 2, got {text}")
    return value


def add_weight_target(p: argparse.ArgumentParser) -> None:
    """The required choice of a HIGGS weight target: --bits B (uniform) or --budget AVG_BITS (the DP allocation)."""
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--bits", type=weight_bits, metavar="B",
                        help=f"uniform HIGGS code bits per weight, a shipped grid width: {_weight_widths()}")
    target.add_argument("--budget", type=finite_positive, metavar="AVG_BITS",
                        help="average bits per weight INCLUDING scales (3 bits at group 256 cost 3.0625) for the DP "
                             "allocation")


positive_int.__name__ = "positive integer"


GRID_DIM = 2  # the HIGGS grid dimension calibrate uses (aquakv.kv.calibrate's default)


def grid_bits_choices(dim: int = GRID_DIM) -> list[float]:
    """Code bits per value the shipped grids of `dim` dimensions can do: log2(points) / dim."""
    from aquakv.grids import bits_per_value_choices

    return bits_per_value_choices(dim)


def code_bits(text: str) -> float:
    """--bits of calibrate: a finite number whose HIGGS grid (dim 2, 2**(2*bits) points) is shipped."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of bits, got {text!r}") from None
    choices = grid_bits_choices()
    if not math.isfinite(value) or value not in choices:
        raise argparse.ArgumentTypeError(
            f"{text} bits per value cannot be coded: HIGGS codes pairs of values on a shipped grid of 2**(2*bits) "
            f"points, so bits must be one of {', '.join(f'{b:g}' for b in choices)}")
    return value


code_bits.__name__ = "bits"


def layer0_bits(text: str) -> str:
    """--layer0-bits: 'fp16' or a value accepted by code_bits (kept as text; the caller converts)."""
    if text != "fp16":
        code_bits(text)
    return text


layer0_bits.__name__ = "layer-0 bits"


# ---- options ----------------------------------------------------------------------------------------------------
def add_common_options(parser: argparse.ArgumentParser) -> None:
    """--device, --seed, -q/--quiet, -v/--verbose: the same on every subcommand."""
    parser.add_argument("--device", default="auto",
                        metavar="DEV",
                        help="torch device: cpu, cuda, cuda:N, or auto (cuda when available, else cpu; default)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed: torch's RNG, and the HIGGS sign seed where something is calibrated (default 0)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (per-layer calibration report)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR",
                        help="local transformers checkpoint directory, or a directory holding --gguf "
                             "(default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf", metavar="FILE",
                        help="GGUF file inside --model (dequantized to fp32 once, then loaded from the conversion "
                             "cache)")


def add_text_option(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("--text", nargs="+", metavar="FILE",
                        help=f"UTF-8 text files, concatenated (default: the bundled {split} text, part of "
                             "Python's own reference documentation)")


def add_text_or_domain_options(parser: argparse.ArgumentParser, split: str, default_domain: str) -> None:
    """--text FILE... or --domain NAME (one of the text domains of aquakv.domains, its `split` part), never both."""
    from aquakv.domains import DOMAINS, MIX

    names = (*DOMAINS, MIX) if split == "calibration" else DOMAINS
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files, concatenated")
    group.add_argument("--domain", choices=names, default=default_domain,
                       help=f"a built-in text domain's {split} part instead of files (default {default_domain}; "
                            "code: Python's reference documentation, legal: license texts, essays, wiki"
                            + (", mix: equal shares of all four" if MIX in names else "")
                            + "; docs/evaluation.md)")


# ---- checks that run before any slow work -----------------------------------------------------------------------
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


def check_files(paths: Optional[Sequence[str]], what: str) -> None:
    """Each path exists and is a file (a directory is called one); UserError naming `what` and the path."""
    for p in paths or ():
        path = Path(p)
        if path.is_dir():
            raise UserError(f"{what} {p} is a directory, not a file")
        if not path.is_file():
            raise UserError(f"{what} not found: {p}")


def check_model_args(args: argparse.Namespace) -> None:
    """Fail before the slow model load on paths that do not exist or have the wrong kind."""
    if args.model is not None:
        if Path(args.model).is_file():
            raise UserError(f"--model {args.model} is a file; give the directory that holds it "
                            "(and the file name with --gguf)")
        if not Path(args.model).is_dir():
            raise UserError(f"--model directory not found: {args.model}")
    if args.gguf is not None and args.model is not None:
        check_files([str(Path(args.model) / args.gguf)], "--gguf file")


def check_out_file(path: str, option: str = "--out") -> Path:
    """The output file can be written: its directory exists and takes a new file (tried with a temporary file,
    removed at once), and it is not itself a directory. Nothing is left behind."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{option} {out} is a directory; give a file name such as {out / 'predictors.safetensors'}")
    if not out.parent.is_dir():
        raise UserError(f"{option}: directory {out.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
    except OSError as e:
        raise UserError(f"{option}: cannot write in directory {out.parent} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return out


# ---- loading ------------------------------------------------------------------------------------------------------
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


# ---- cache names -------------------------------------------------------------------------------------------------
# One naming across commands: a cache's name is its table label in lowercase without dashes (AQUA-KV-2 is aquakv2,
# KIVI-2 kivi2, HIGGS-2 (no predictors) higgs2), and every command accepts either spelling. `aquakv` alone is AQUA-KV
# at the --predictors file's bits; aquakvB names the bits and checks them against the file.
_AQUAKV_BITS = re.compile(r"aquakv(\d+(?:\.\d+)?)(-bf16)?")


def cache_name(text: str) -> str:
    """The canonical spelling of a cache name or table label: 'AQUA-KV-2' -> 'aquakv2', 'KIVI-2' -> 'kivi2',
    'HIGGS-2 (no predictors)' -> 'higgs2', 'AQUA-KV-2-bf16' -> 'aquakv2-bf16'; registry names stay as they are."""
    name = re.sub(r"\s*\(.*\)$", "", text.strip()).lower()
    bf16 = name.endswith("-bf16")
    name = name[: -len("-bf16")] if bf16 else name
    return name.replace("-", "").replace("_", "").replace(" ", "") + ("-bf16" if bf16 else "")


def registry_entry(name: str, predictors=None, option: str = "--caches") -> str:
    """The registry entry a canonical cache name stands for, checking aquakvB's bits against the predictors.
    UserError (naming the known names) for anything else."""
    from aquakv.kv import registry

    m = _AQUAKV_BITS.fullmatch(name)
    entry = ("aquakv" + (m.group(2) or "")) if m else name
    if entry not in registry.names():
        raise UserError(f"{option} {name!r} is not a cache name: {', '.join(registry.names())}, aquakvB or "
                        "aquakvB-bf16 (a table label such as AQUA-KV-2 or KIVI-2 is accepted too)")
    if m and predictors is not None and float(m.group(1)) != predictors.settings.bits:
        raise UserError(f"{option} {name}: the --predictors file was calibrated at {predictors.settings.bits:g} bits")
    return entry


def check_window_fits(model, window: int, option: str = "--window") -> None:
    """A window longer than the model's positions is refused (UserError) before any slow work, as longctx's
    --context is: past them a RoPE model's outputs are meaningless, and a huge window only runs on for long."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and window > limit:
        raise UserError(f"{option} {window} exceeds the model's {limit} positions")


def read_texts(files: Optional[Sequence[str]], split: str, domain: Optional[str] = None) -> list[str]:
    """The --text files, else the `split` part of text domain `domain` (aquakv.domains), else the bundled text of
    `split`; checked: missing, directory, empty or binary file, or a domain whose source is not installed ->
    UserError."""
    from aquakv.data import default_texts, read_text_files
    from aquakv.domains import domain_texts

    if files:
        try:
            return read_text_files(files)
        except (OSError, ValueError) as e:
            raise UserError(str(e)) from None
    if domain is None:
        return default_texts(split)
    try:
        return domain_texts(domain, split)
    except FileNotFoundError as e:
        raise UserError(f"--domain {domain}: {e}; or pass --text FILE ... (or --domain code, which ships with "
                        "Python)") from None


def token_ids(tokenizer, files: Optional[Sequence[str]], split: str, texts: Optional[list[str]] = None):
    """1-D LongTensor of the --text files (or the bundled text of `split`); `texts`: already read by read_texts."""
    from aquakv.data import tokenize

    return tokenize(tokenizer, texts if texts is not None else read_texts(files, split))


# ---- output -------------------------------------------------------------------------------------------------------
def show_progress(args: argparse.Namespace) -> bool:
    """Raw tqdm bars (code not yet on aquakv.progress, third-party loaders) only when asked for (no -q) and stderr
    is a terminal: redirected logs get none."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def progress_on(args: argparse.Namespace) -> bool:
    """Progress through aquakv.progress unless -q: a bar on a terminal, a plain line every ~10 s in a redirected
    log (so a long run shows it is alive without filling the log with bar frames)."""
    return not getattr(args, "quiet", False)


@contextlib.contextmanager
def bars_off(off: bool):
    """While the command runs, every tqdm bar defaults to disabled (off=True): transformers' GGUF loader draws a
    plain tqdm bar that transformers' own switch does not reach."""
    if not off:
        yield
        return
    import tqdm

    init = vars(tqdm.tqdm)["__init__"]  # the raw class attribute (tqdm's own is a partialmethod descriptor)
    tqdm.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init


def setup(args: argparse.Namespace) -> None:
    """Logging level from -q/-v, transformers' bars and warnings off without progress, --device resolved, seeded."""
    import torch

    logging.basicConfig(format="%(message)s")
    logging.getLogger("aquakv").setLevel(logging.WARNING if args.quiet and not args.verbose else logging.INFO)
    if args.quiet or not show_progress(args):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        if args.quiet:
            transformers.utils.logging.set_verbosity_error()
    args.device = resolve_device(args.device)
    torch.manual_seed(args.seed)
