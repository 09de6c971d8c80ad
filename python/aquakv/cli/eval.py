"""`aquakv eval`: perplexity with an unquantized cache vs AQUA-KV and baselines from the cache registry."""
from __future__ import annotations

import argparse
from pathlib import Path

from aquakv.cli import common
from aquakv.cli.common import (
    UserError,
    add_common_options,
    add_model_options,
    add_text_or_domain_options,
    check_files,
    check_model_args,
    positive_int,
    read_texts,
    token_ids,
)

ALWAYS = ("fp16", "aquakv")  # the rows every eval prints; --baselines adds others from aquakv.kv.registry


class _Baselines:
    """The --baselines choices: registry names (or aquakvB, or a table label: common.cache_name), looked up only
    when an eval command is parsed or its help shown."""

    def _names(self) -> list[str]:
        from aquakv.kv import registry

        return [n for n in registry.names() if n not in ALWAYS]

    def __contains__(self, name) -> bool:
        try:
            common.registry_entry(name, option="--baselines")
        except UserError:
            return False
        return name not in ALWAYS

    def __iter__(self):
        return iter(self._names())


class _EvalParser(common.Parser):
    """Adds the registry's descriptions to `aquakv eval --help` when the help is printed. Only the registry's own
    module is read: whether a backend is installed needs torch, so runs report it, not --help."""

    def format_help(self) -> str:
        from aquakv.kv import registry

        listing = "\n".join(f"  {e.name:<11} {e.description}" for e in registry.REGISTRY.values()
                            if e.name not in ALWAYS)
        self.epilog = f"baselines (--baselines, any of):\n{listing}\n\n{EVAL_EPILOG}"
        return super().format_help()


EVAL_EPILOG = """\
Every row is measured on the same windows with the same protocol: each window of --window tokens goes through
the model --step tokens at a time with a fresh cache (docs/evaluation.md). bits/value counts all bytes held
(codes, scales, zero points, the fp16 sinks and recent buffer) over all cached keys and values of a full window.
Rows whose backend is not installed are listed under the table with the reason.

example:
  aquakv eval --predictors p.safetensors --baselines kivi2 kivi4 higgs --plot ppl.png
"""

EVAL_DESCRIPTION = """\
Measure perplexity on text with an unquantized (fp16) KV cache and with the AQUA-KV cache
built from `aquakv calibrate` predictors, optionally beside baselines, and print a table.
"""


def load_predictors(path: str):
    """AquaKVPredictors from --predictors; any unreadable, truncated or foreign file is a one-line UserError."""
    from safetensors import SafetensorError

    from aquakv.kv import AquaKVPredictors

    try:
        return AquaKVPredictors.load(path)
    except (ValueError, OSError, KeyError, SafetensorError) as e:
        raise UserError(f"--predictors {path}: cannot read AQUA-KV predictors ({e})") from None


def run_eval(args: argparse.Namespace) -> int:
    from aquakv.evaluation import BITS_NOTE
    from aquakv.evaluation.compare import compare_caches
    from aquakv.evaluation.table import count
    from aquakv.kv import AquaKVCache, registry

    check_model_args(args)
    check_files(args.text, "text file")
    check_files([args.predictors], "--predictors file")
    if args.plot is not None:
        _check_plot(args.plot)
    texts = read_texts(args.text, "evaluation", args.domain)
    preds = load_predictors(args.predictors)
    model, tokenizer = common.load(args)
    common.check_window_fits(model, args.window)
    try:
        preds.check_compatible(model)
    except ValueError as e:
        raise UserError(f"--predictors {args.predictors}: {e}") from None
    try:  # before the slow part: a model the cache cannot serve (e.g. no rotary embedding module to hook)
        AquaKVCache(model, preds).close()
    except ValueError as e:
        raise UserError(f"the AQUA-KV cache cannot serve this model: {e}") from None
    ids = token_ids(tokenizer, None, "evaluation", texts=texts)
    if ids.numel() < args.window:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one --window of {args.window}")
    extra = [common.registry_entry(name, preds, "--baselines") for name in args.baselines or ()]
    rows = registry.rows([*ALWAYS, *extra], predictors=preds, seed=args.seed)
    result = compare_caches(model, ids, rows, window=args.window, step=args.step, max_windows=args.max_windows,
                            batch_size=args.batch_size, progress=common.progress_on(args))
    n = result.rows[0][1]
    print(f"perplexity on {count(n.n_windows, 'window')} of {args.window} tokens ({n.n_tokens} predictions), "
          f"fed {args.step} tokens at a time:\n")
    print(result.table())
    print(f"\n{BITS_NOTE}")
    for line in result.never_compressed(args.window):
        print(line)
    for label, why in result.skipped:
        print(f"{label}: skipped, {why}")
    if args.plot is not None:
        from aquakv.evaluation.plot import plot_perplexity_vs_bits

        path = plot_perplexity_vs_bits(result.rows, args.plot, baseline=n.ppl,
                                       title=f"perplexity vs bits per value ({count(n.n_windows, 'window')} "
                                             f"of {args.window} tokens)")
        print(f"plot written to {path}")
    return 0


def _check_plot(path: str) -> None:
    """--plot: a .png name in a writable directory, and matplotlib importable: all before the model load."""
    import importlib.util

    if Path(path).suffix.lower() != ".png":
        raise UserError(f"--plot {path}: the plot is a PNG file; give a name ending in .png")
    common.check_out_file(path, "--plot")
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or pip install 'aquakv[plot]')")


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity with an unquantized cache vs AQUA-KV (and baselines)",
        description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.__class__ = _EvalParser  # add_parser builds plain ArgumentParsers; this one lists the registry in its help
    add_model_options(p)
    p.add_argument("--predictors", required=True, metavar="P", help="a .safetensors file from `aquakv calibrate`")
    add_text_or_domain_options(p, "evaluation", "code")
    p.add_argument("--window", type=positive_int, default=1024, metavar="W", help="tokens per evaluation window (default 1024)")
    p.add_argument("--step", type=positive_int, default=32, metavar="S", help="tokens per forward call (default 32)")
    p.add_argument("--max-windows", type=positive_int, metavar="N", help="evaluate at most this many windows (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="windows per forward (speed only; default 1)")
    p.add_argument("--baselines", nargs="+", type=common.cache_name, choices=_Baselines(), metavar="NAME",
                   help="extra rows from the cache registry (listed below; a table label such as KIVI-2 names the "
                        "same cache as kivi2); unavailable ones are reported, not run")
    p.add_argument("--plot", metavar="FILE.png", help="also write perplexity against bits/value as a PNG "
                   "(needs matplotlib)")
    add_common_options(p)
    p.set_defaults(func=run_eval)
