"""`aquakv eval`: perplexity with an unquantized cache vs AQUA-KV and baselines."""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

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


EVAL_DESCRIPTION = """\
Measure perplexity on text with an unquantized (fp16) KV cache and with the AQUA-KV cache
built from `aquakv calibrate` predictors, optionally beside baselines, and print a table.
"""


def baseline_factories(names: Sequence[str], predictors) -> list[tuple[str, Optional[Callable], Optional[str]]]:
    """(row name, cache factory or None, note) for each requested baseline; a missing backend gives a note."""
    from aquakv.kv import HiggsCache
    from aquakv.kv.baselines import (
        transformers_cache_backends,
        transformers_quantized_factory,
    )
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
    model, tokenizer = common.load(args)
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
