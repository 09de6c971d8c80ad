"""The `aquakv` command: demo, calibrate, eval, quantize-weights, pv-tune, longctx.

One convention for every subcommand: --device (auto by default), --seed, -q/-v; user mistakes (a missing file, a
directory where a file belongs, an option value that cannot work, a model that cannot be loaded or served,
predictors of another model) end with one line on stderr, `aquakv <command>: error: ...`, and exit status 2,
found before any slow work starts; Ctrl-C ends with status 130. Library code reports bad inputs as ValueError
with a message naming them, and files that cannot be read as OSError, so both are shown the same way;
AQUAKV_DEBUG=1 shows their traceback instead. Anything else is a bug and keeps its traceback.

Startup is fast: this package and its subcommand modules import torch and transformers only inside the
functions that run a command, so parsing arguments and --help never load them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from aquakv.cli import weights as weights_cli
from aquakv.cli.calibrate import add_calibrate
from aquakv.cli.common import Parser, UserError, bars_off, setup, show_progress
from aquakv.cli.demo import add_demo
from aquakv.cli.eval import add_eval
from aquakv.cli.generate import add_generate
from aquakv.cli.longctx import add_longctx
from aquakv.cli.pvtune import add_parser as add_pv_tune

log = logging.getLogger("aquakv")


class _VersionAction(argparse.Action):
    """--version, resolved only when asked for (from the installed distribution's metadata: no torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from aquakv.version import version

        print(f"aquakv {version()}")  # on stdout, as argparse's own version action does
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="aquakv",
        description="AQUA-KV: compress a language model's KV cache by predicting each layer's keys and values "
                    "from the previous layer and quantizing only the residual with HIGGS.",
        epilog="start with `aquakv demo`; `aquakv COMMAND --help` explains each command. Exit status: 0 done, "
               "2 a usage or input error (one line on stderr), 130 interrupted.")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_demo(sub)
    add_calibrate(sub)
    add_eval(sub)
    add_longctx(sub)
    weights_cli.add_parser(sub)
    add_pv_tune(sub)
    add_generate(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"aquakv {args.command}"
    try:
        setup(args)
        with bars_off(not show_progress(args)):
            return int(args.func(args) or 0)
    except (UserError, OSError) as e:
        if os.environ.get("AQUAKV_DEBUG") and not isinstance(e, UserError):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:
        # Library functions raise ValueError with a message naming the bad input (bits, window, text too short...)
        if os.environ.get("AQUAKV_DEBUG"):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
