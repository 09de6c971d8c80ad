"""The `aquakv` command: demo, calibrate, eval (and quantize-weights when aquakv.weights is installed).

User mistakes (a missing file, a model that cannot be loaded or served, predictors calibrated for another model,
a bad option value) end with one line on stderr, `aquakv <command>: error: ...`, and exit status 2; anything
else is a bug and keeps its traceback. Library code reports bad inputs as ValueError with a message naming
them, so a ValueError is shown the same way; AQUAKV_DEBUG=1 shows its traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger("aquakv")

BASELINES = ("kivi2", "kivi4", "higgs", "fp8", "quanto", "hqq")

EVAL_EPILOG = """\
baselines (--baselines, any of):
  kivi2, kivi4  KIVI-style uniform quantization at 2 / 4 bits (keys per channel over 32 tokens, values per token
                over 32 channels, fp16 scale and zero point per group) under the same sinks/buffer policy
  higgs         HIGGS on the states without predictors, at the predictors' bits (the ablation of AQUA-KV)
  fp8           transformers' QuantizedCache, fp8 backend (built in)
  quanto, hqq   transformers' QuantizedCache with that backend at 2 bits (skipped with a note when missing)

Every row is evaluated on the same windows with the same protocol: each window of --window tokens goes through
the model --step tokens at a time with a fresh cache (DESIGN.md section 3). bits/value counts every stored
byte (codes, scales, fp16 sinks and buffer) over all cached keys and values of a full window.
"""


CALIBRATE_DESCRIPTION = """\
Fit AQUA-KV's per-layer linear predictors on calibration text, with quantization in the
loop (keys of layer l are predicted from layer l-1's reconstructed keys, values from
[keys of layer l; values of layer l-1]; only the residual is quantized with HIGGS), and
save them in one .safetensors file for `aquakv eval` or aquakv.AquaKVCache. The file
records the model's shape; using it with another model is refused.
"""

EVAL_DESCRIPTION = """\
Measure perplexity on text with an unquantized (fp16) KV cache and with the AQUA-KV cache
built from `aquakv calibrate` predictors, optionally beside baselines, and print a table.
"""

DEMO_DESCRIPTION = """\
The whole pipeline on the bundled SmolLM2-135M-Instruct and bundled text (Python's
reference documentation): calibrate AQUA-KV at 2 and 3 bits on one part of the text,
measure perplexity on the held-out part with an unquantized cache, KIVI-2/4, HIGGS-2
without predictors, AQUA-KV-2/3 and transformers' own quantized cache, then answer a
question about a held-out passage through the AQUA-KV cache. No arguments needed.
"""


class UserError(Exception):
    """A problem with the command line or its inputs: reported in one line, exit status 2."""


# ---- shared options and helpers -----------------------------------------------------------------------------
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


# ---- calibrate ----------------------------------------------------------------------------------------------
def run_calibrate(args: argparse.Namespace) -> int:
    from aquakv.kv import calibrate

    _check_model_args(args)
    _check_files(args.text, "text file")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'predictors.safetensors'}")
    if not out.parent.exists():
        raise UserError(f"--out: directory {out.parent} does not exist")
    layer0 = args.layer0_bits if args.layer0_bits == "fp16" else float(args.layer0_bits)
    model, tokenizer = load(args)
    ids = token_ids(tokenizer, args.text, "calibration")
    t0 = time.perf_counter()
    preds = calibrate(model, [ids], bits=args.bits, window=args.window, max_windows=args.windows,
                             rank=args.rank, layer0_bits=layer0, seed=args.seed, progress=not args.quiet)
    preds.save(out)
    print(f"{preds}\ncalibrated in {time.perf_counter() - t0:.1f} s on {preds.calibration.get('windows')} windows "
          f"of up to {args.window} tokens; saved to {out}")
    return 0


def _bits(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _layer0(text: str) -> str:
    if text != "fp16":
        _bits(text)
    return text


def add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="fit AQUA-KV predictors on calibration text and save them",
        description=CALIBRATE_DESCRIPTION,
        epilog="example:\n  aquakv calibrate --text corpus.txt --bits 2 --out smollm2-2bit.safetensors\n"
               "  aquakv calibrate --model DIR --gguf m.gguf --text a.txt b.txt --bits 3 --rank 64 --out p.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_options(p)
    _text_option(p, "calibration")
    p.add_argument("--bits", type=_bits, default=2.0, metavar="B",
                   help="code bits per value of the quantized residuals, layers >= 1 (2, 3, 4; default 2)")
    p.add_argument("--out", required=True, metavar="P", help="output .safetensors file")
    p.add_argument("--rank", type=_positive_int, metavar="R", help="reduced-rank predictors of rank R (default: full rank)")
    p.add_argument("--windows", type=_positive_int, default=32, metavar="N",
                   help="calibration windows, spread over the text (default 32)")
    p.add_argument("--window", type=_positive_int, default=1024, metavar="W", help="tokens per calibration window (default 1024)")
    p.add_argument("--layer0-bits", type=_layer0, default="4", metavar="B|fp16",
                   help="bits of layer 0 (centered HIGGS; it has no predecessor to predict from) or fp16 "
                        "(default 4)")
    _common(p)
    p.set_defaults(func=run_calibrate)


# ---- eval ---------------------------------------------------------------------------------------------------
def baseline_factories(names: Sequence[str], predictors) -> list[tuple[str, Optional[Callable], Optional[str]]]:
    """(row name, cache factory or None, note) for each requested baseline; a missing backend gives a note."""
    from aquakv.kv import HiggsCache
    from aquakv.kv.baselines import transformers_cache_backends, transformers_quantized_factory
    from aquakv.kv.kivi import kivi_factory

    rows: list[tuple[str, Optional[Callable], Optional[str]]] = []
    backends = transformers_cache_backends()
    for name in names:
        if name in ("kivi2", "kivi4"):
            rows.append((f"KIVI-{name[-1]}", kivi_factory(int(name[-1])), None))
        elif name == "higgs":
            s = predictors.settings
            rows.append((f"HIGGS-{s.bits:g}", lambda m, s=s: HiggsCache(m, s.bits, grid_dim=s.grid_dim,
                                                                         group_size=s.group_size, seed=s.seed), None))
        else:
            label = f"transformers QuantizedCache ({name}{'' if name == 'fp8' else ', 2 bits'})"
            why = backends.get(name)
            rows.append((label, None if why else transformers_quantized_factory(name, bits=2), why))
    return rows


def run_eval(args: argparse.Namespace) -> int:
    import aquakv
    from aquakv.evaluation import evaluate_perplexity, format_table
    from aquakv.kv.baselines import fp16_cache_factory

    _check_model_args(args)
    _check_files(args.text, "text file")
    _check_files([args.predictors], "--predictors file")
    try:
        preds = aquakv.AquaKVPredictors.load(args.predictors)
    except (ValueError, OSError) as e:
        raise UserError(f"--predictors {args.predictors}: {e}") from None
    model, tokenizer = load(args)
    try:
        preds.check_compatible(model)
    except ValueError as e:
        raise UserError(f"--predictors {args.predictors}: {e}") from None
    try:  # before the slow part: a model the cache cannot serve (e.g. no rotary embedding module to hook)
        aquakv.AquaKVCache(model, preds).close()
    except ValueError as e:
        raise UserError(f"the AQUA-KV cache cannot serve this model: {e}") from None
    ids = token_ids(tokenizer, args.text, "evaluation")
    if ids.numel() < args.window:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one --window of {args.window}")
    rows = [("fp16 (unquantized)", fp16_cache_factory, None),
            (f"AQUA-KV-{preds.settings.bits:g}", lambda m: aquakv.AquaKVCache(m, preds), None)]
    rows += baseline_factories(args.baselines or (), preds)
    results, notes = [], []
    for name, factory, note in rows:
        if factory is None:
            notes.append(f"{name}: skipped, {note}")
            continue
        r = evaluate_perplexity(model, ids, factory, window=args.window, step=args.step, max_windows=args.max_windows,
                                batch_size=args.batch_size, progress=not args.quiet, desc=name)
        results.append((name, r))
    n = results[0][1]
    print(f"perplexity on {n.n_windows} windows of {args.window} tokens ({n.n_tokens} predictions), "
          f"step {args.step}:\n")
    print(format_table(results, baseline=results[0][1].ppl))
    for note in notes:
        print(f"\n{note}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity with an unquantized cache vs AQUA-KV (and baselines)",
        description=EVAL_DESCRIPTION,
        epilog=EVAL_EPILOG + "\nexample:\n  aquakv eval --predictors p.safetensors --baselines kivi2 kivi4 higgs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_options(p)
    p.add_argument("--predictors", required=True, metavar="P", help="a .safetensors file from `aquakv calibrate`")
    _text_option(p, "evaluation")
    p.add_argument("--window", type=_positive_int, default=1024, metavar="W", help="tokens per evaluation window (default 1024)")
    p.add_argument("--step", type=_positive_int, default=32, metavar="S", help="tokens per forward call (default 32)")
    p.add_argument("--max-windows", type=_positive_int, metavar="N", help="evaluate at most this many windows (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N", help="windows per forward (speed only; default 1)")
    p.add_argument("--baselines", nargs="+", choices=BASELINES, metavar="NAME",
                   help=f"extra rows: {', '.join(BASELINES)} (see below)")
    _common(p)
    p.set_defaults(func=run_eval)


# ---- demo ---------------------------------------------------------------------------------------------------
def run_demo_command(args: argparse.Namespace) -> int:
    from aquakv.demo import run_demo

    run_demo(device=args.device, quick=args.quick, seed=args.seed, progress=not args.quiet)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="calibrate, evaluate and generate on the bundled SmolLM2 (no arguments needed)",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer calibration and evaluation windows, shorter windows (a smoke test; noisier numbers)")
    _common(p)
    p.set_defaults(func=run_demo_command)


# ---- main ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from aquakv import __version__

    parser = argparse.ArgumentParser(
        prog="aquakv",
        description="AQUA-KV: compress a language model's KV cache by predicting each layer's keys and values "
                    "from the previous layer and quantizing only the residual with HIGGS.",
        epilog="start with `aquakv demo`; `aquakv COMMAND --help` explains each command.")
    parser.add_argument("--version", action="version", version=f"aquakv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_demo(sub)
    add_calibrate(sub)
    add_eval(sub)
    try:
        from aquakv.cli import weights as weights_cli
    except ImportError as e:  # the weights subpackage is optional
        log.debug("quantize-weights unavailable: %s", e)
    else:
        weights_cli.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"aquakv {args.command}"
    try:
        if hasattr(args, "quiet"):
            _setup(args)
        else:  # a subcommand with its own options (quantize-weights)
            logging.basicConfig(format="%(message)s")
            logging.getLogger("aquakv").setLevel(logging.INFO)
        with _bars_off(getattr(args, "quiet", False)):
            return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # subcommands from other modules report user errors as SystemExit("message")
        if isinstance(e.code, str):
            print(f"{prog}: error: {e.code.removeprefix(args.command + ': ')}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:
        # Library functions raise ValueError with a message naming the bad input (bits, window, text too short...)
        if os.environ.get("AQUAKV_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
