"""The `aquakv` command: demo, calibrate, eval (and quantize-weights when aquakv.weights is installed).

User mistakes (a missing file, a model that cannot be loaded or served, predictors calibrated for another model,
a bad option value) end with one line on stderr, `aquakv <command>: error: ...`, and exit status 2; anything
else is a bug and keeps its traceback. Library code reports bad inputs as ValueError with a message naming
them, so a ValueError is shown the same way; AQUAKV_DEBUG=1 shows its traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from aquakv.cli.calibrate import add_calibrate
from aquakv.cli.common import UserError, _bars_off, _setup
from aquakv.cli.demo import add_demo
from aquakv.cli.eval import add_eval

log = logging.getLogger("aquakv")


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
