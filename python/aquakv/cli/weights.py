"""`aquakv quantize-weights`: HIGGS weight quantization from the command line (the work is
aquakv.weights.pipeline.quantize_weights; this module parses, checks what it can before the model load, and prints)."""
from __future__ import annotations

import argparse
from pathlib import Path

from aquakv.cli import common
from aquakv.cli.common import (
    UserError,
    add_common_options,
    add_model_options,
    add_weight_target,
    check_files,
    check_model_args,
    finite_positive,
    positive_int,
    power_of_two,
)

DESCRIPTION = """\
Quantize a model's linear layers with HIGGS (data-free: random Hadamard rotation + MSE-optimal Gaussian grid,
one fp16 scale per group), either at the same bit width everywhere (--bits) or with a per-layer bit width chosen
by dynamic programming under an average budget (--budget, docs/weights.md): every layer's sensitivity is measured by
adding Gaussian noise to it alone on calibration text, and the DP minimises the predicted loss increase.
Embeddings and the output head stay in full precision unless --include-lm-head.

Writes OUT/higgs_weights.safetensors + OUT/higgs_weights.json (load with aquakv.weights.load_quantized on a
fresh copy of the same model), OUT/sensitivities.json (reusable with --sensitivities), OUT/allocation.json
(with the DP), and with --eval OUT/results.json. Bits per weight always include the fp16 group scales. The
bundled model is a Q4_1 GGUF: its "unquantized" reference is the dequantized Q4_1 weights in fp32.
"""

EPILOG = """\
examples:
  aquakv quantize-weights --bits 4 --out q4                    # bundled SmolLM2-135M, uniform 4 bits
  aquakv quantize-weights --budget 3.0625 --out q3 --eval      # DP allocation, table vs RTN / uniform
  aquakv quantize-weights --model DIR --gguf m.gguf --bits 3 --out q3 --eval --sensitivities q4/sensitivities.json
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `quantize-weights` on an argparse subparsers object; the parser's default func is `run`."""
    p = subparsers.add_parser("quantize-weights", help="HIGGS weight quantization with optional DP bit allocation",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    add_weight_target(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created when the first file is written)")
    p.add_argument("--group-size", type=power_of_two, default=256, help="values per scale and Hadamard block (power of two; default 256)")
    p.add_argument("--include-lm-head", action="store_true", help="also quantize the output head")
    p.add_argument("--min-bits", type=finite_positive, default=2.0, help="smallest candidate grid width for the DP (default 2)")
    p.add_argument("--max-bits", type=finite_positive, default=8.0, help="largest candidate grid width for the DP (default 8)")
    p.add_argument("--sensitivities", metavar="FILE", help="reuse a sensitivities.json from an earlier run instead of measuring")
    p.add_argument("--noise", type=finite_positive, default=0.01, help="relative MSE t^2 of the noise injected per layer (default 0.01)")
    p.add_argument("--calib-windows", type=positive_int, default=4, help="calibration windows for sensitivities (default 4)")
    p.add_argument("--calib-len", type=positive_int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--eval", action="store_true",
                   help="print perplexity on held-out text for: unquantized, RTN at the same bits, HIGGS uniform, and "
                        "HIGGS + DP with --budget (or --dp-row)")
    p.add_argument("--dp-row", action="store_true",
                   help="with --bits and --eval, also the DP allocation at the same size as a row: measures the "
                        "sensitivities unless --sensitivities (about 10 min for SmolLM2-135M on one thread)")
    p.add_argument("--eval-window", type=positive_int, default=1024, help="tokens per evaluation window (default 1024)")
    p.add_argument("--eval-windows", type=positive_int, default=None, help="at most this many evaluation windows (default: all)")
    add_common_options(p)
    p.set_defaults(func=run)
    return p


def _check_before_load(args: argparse.Namespace) -> None:
    """Everything that can be refused without the model: paths, option values, the output directory, the device."""
    from aquakv.weights.pipeline import (
        check_output_dir,
        check_run_options,
        check_weight_options,
    )

    check_model_args(args)
    check_files([args.sensitivities] if args.sensitivities else None, "--sensitivities file")
    if args.dp_row and not (args.eval and args.bits is not None):
        raise UserError("--dp-row adds the DP's row to the --eval table of a --bits run; give --bits and --eval")
    try:  # the messages name the option as the library spells it (budget=, group_size=, ...)
        check_weight_options(bits=args.bits, budget=args.budget, group_size=args.group_size, min_bits=args.min_bits,
                             max_bits=args.max_bits)
        check_run_options(noise=args.noise, calib_windows=args.calib_windows, calib_len=args.calib_len,
                          eval_window=args.eval_window, eval_windows=args.eval_windows)
        check_output_dir(args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    args.device = common.resolve_device(args.device)


def run(args: argparse.Namespace) -> int:
    """Execute `quantize-weights` (the parser's func); user errors raise common.UserError."""
    from aquakv.weights.pipeline import WeightSettings, quantize_weights

    _check_before_load(args)
    settings = WeightSettings(
        bits=args.bits, budget=args.budget, group_size=args.group_size, seed=args.seed,
        include_lm_head=args.include_lm_head, min_bits=args.min_bits, max_bits=args.max_bits,
        sensitivities=args.sensitivities, noise=args.noise, calib_windows=args.calib_windows, calib_len=args.calib_len,
        evaluate=args.eval, eval_window=args.eval_window, eval_windows=args.eval_windows, dp_row=args.dp_row,
        label=args.model or "bundled SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)")
    common.log.info("%s", plan_summary(settings))
    model, tokenizer = common.load(args)
    # Progress on every phase: a bar on a terminal, a line every ~10 s in a redirected log (aquakv.progress).
    report = quantize_weights(model, tokenizer, settings, out=Path(args.out), progress=not args.quiet)
    if report.rows:
        from aquakv.evaluation import format_table

        print(format_table(report.rows, baseline=report.rows[0][1].ppl, baseline_name="unquantized",
                           bits_name="bits/weight", bits_digits=4))
    how = "DP allocation" if args.budget is not None else f"uniform {report.uniform_bits:g}-bit"
    print(f"saved {args.out}/: {report.average_bits:.4f} bits/weight over the quantized linears ({how})")
    return 0


def plan_summary(settings) -> str:
    """One line saying what the run will do, before the model loads."""
    if settings.budget is not None:
        what = (f"the DP allocation at {settings.budget:g} bits/weight: layer errors, "
                + ("the given sensitivities" if settings.sensitivities else
                   f"the sensitivities on {settings.calib_windows} windows of {settings.calib_len} tokens (about 10 "
                   f"min for SmolLM2-135M on one thread)"))
    else:
        what = f"HIGGS {settings.bits:g}-bit everywhere"
        if settings.dp_row:
            what += " and, for the table's DP row, the DP allocation at the same size (" + (
                "the given sensitivities)" if settings.sensitivities else "measures the sensitivities: ~10 min)")
    if settings.evaluate:
        rows = 4 if settings.needs_dp else 3
        windows = f"at most {settings.eval_windows}" if settings.eval_windows else "all"
        what += (f"; then {rows} models evaluated on {windows} windows of {settings.eval_window} tokens of the "
                 f"evaluation text (one forward per window and model)")
    return f"quantize-weights: {what}"
