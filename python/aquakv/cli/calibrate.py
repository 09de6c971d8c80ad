"""`aquakv calibrate`: fit AQUA-KV predictors on calibration text and save them."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from aquakv.cli import common
from aquakv.cli.common import (
    UserError,
    _check_files,
    _check_model_args,
    _common,
    _model_options,
    _positive_int,
    _text_option,
    token_ids,
)

CALIBRATE_DESCRIPTION = """\
Fit AQUA-KV's per-layer linear predictors on calibration text, with quantization in the
loop (keys of layer l are predicted from layer l-1's reconstructed keys, values from
[keys of layer l; values of layer l-1]; only the residual is quantized with HIGGS), and
save them in one .safetensors file for `aquakv eval` or aquakv.AquaKVCache. The file
records the model's shape; using it with another model is refused.
"""


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
    model, tokenizer = common.load(args)
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
