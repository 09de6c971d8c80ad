"""`aquakv demo`: the whole pipeline on the bundled model and text."""
from __future__ import annotations

import argparse

from aquakv.cli.common import add_common_options, progress_on

DEMO_DESCRIPTION = """\
The whole pipeline on the bundled SmolLM2-135M-Instruct and bundled text (Python's
reference documentation): calibrate AQUA-KV at 2 and 3 bits on one part of the text,
measure perplexity on the held-out part with an unquantized cache, KIVI-2/4, HIGGS-2
without predictors, AQUA-KV-2/3 and transformers' own quantized cache, then answer a
question about a held-out passage through the AQUA-KV cache. No arguments needed.

The report (table, answers, timings) goes to stdout; progress goes to stderr: bars on a
terminal, a plain line every ~10 s and at the end of each phase in a redirected log.
"""


def run_demo_command(args: argparse.Namespace) -> int:
    from aquakv.demo import run_demo

    run_demo(device=args.device, quick=args.quick, seed=args.seed, progress=progress_on(args))
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="calibrate, evaluate and generate on the bundled SmolLM2 (no arguments needed)",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer calibration and evaluation windows, shorter windows (a smoke test; noisier numbers)")
    add_common_options(p)
    p.set_defaults(func=run_demo_command)
