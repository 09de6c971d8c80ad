"""`aquakv longctx`: passkey retrieval and long-window perplexity, every cache side by side."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from aquakv.cli import common
from aquakv.cli.common import (
    UserError,
    add_common_options,
    add_model_options,
    add_text_option,
    cache_name,
    check_files,
    check_model_args,
    log,
    positive_int,
    registry_entry,
)

LONGCTX_DESCRIPTION = """\
Long-context quality of KV caches. --task needle: a five-digit pass key hidden in real text at several depths,
asked for at the end; exact-match accuracy per context length and depth for every cache, and a heatmap PNG per
cache with --heatmap-dir. --task ppl: perplexity over windows of --context tokens, the first --prefill tokens fed
--chunk at a time, the rest --step at a time; every prediction is scored, and the stepped tail is also reported
alone (docs/long_context.md states both protocols).
"""

LONGCTX_EPILOG = """\
caches (--caches): the names of the cache registry that `aquakv eval --help` describes (fp16, dynamic, kivi4,
  kivi2, higgs2, higgs3, higgs, aquakv, aquakv-bf16, fp8, quanto, hqq), plus aquakvB and aquakvB-bf16: AQUA-KV with
  the --predictors file, checking that it was calibrated at B bits (-bf16: predictor matmuls in bfloat16). A table
  label of `aquakv eval` names the same cache (AQUA-KV-2 is aquakv2, KIVI-2 kivi2). The first cache is the baseline
  every row is compared with.

examples:
  aquakv longctx --task needle --context 1024 2048 4096 8192 --samples 3 --caches fp16 kivi2 higgs2 aquakv2 \\
      --predictors p.safetensors --heatmap-dir plots
  aquakv longctx --task ppl --context 4096 8192 --max-windows 2 --caches fp16 aquakv2 --predictors p.safetensors
"""


def cache_factories(names: Sequence[str], predictors=None, attention: str = "materialize"
                    ) -> list[tuple[str, Callable]]:
    """(name, factory) for each --caches name: a name of aquakv.kv.registry, or aquakvB (AQUA-KV, checking that the
    --predictors file was calibrated at B bits), in either spelling (kivi2 or KIVI-2; see common.cache_name); the
    name returned is the canonical one. A bad name raises UserError."""
    from aquakv.kv import registry

    out: list[tuple[str, Callable]] = []
    for name in map(cache_name, names):
        entry = registry.get(registry_entry(name, predictors))
        if entry.needs_predictors and predictors is None:
            raise UserError(f"--caches {name} needs --predictors (a file from `aquakv calibrate`)")
        why = entry.unavailable()
        if why is not None:
            raise UserError(f"--caches {name} is unavailable here: {why}")
        out.append((name, entry.factory(predictors, attention=attention)))
    if len({n for n, _ in out}) != len(out):
        raise UserError(f"--caches names a cache twice: {' '.join(names)}")
    return out


def _filler_texts(args: argparse.Namespace) -> list[str] | None:
    """The haystack's texts: --text files, else the repeated plain sentences (--filler repeat) or the bundled docs
    (None: Haystack's default)."""
    from aquakv.data import read_text_files
    from aquakv.longctx.haystack import REPEATED_FILLER

    if args.text:
        return read_text_files(args.text)
    return [REPEATED_FILLER] if args.filler == "repeat" else None


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _depth(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _load_predictors(path: Optional[str]):
    if path is None:
        return None
    from aquakv.kv import AquaKVPredictors

    check_files([path], "--predictors file")
    try:
        return AquaKVPredictors.load(path)
    except (ValueError, OSError) as e:
        raise UserError(f"--predictors {path}: {e}") from None


def _check_model(model, predictors, path: Optional[str], contexts: Sequence[int], margin: int) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and max(contexts) + margin > limit:
        raise UserError(f"--context {max(contexts)} (+{margin} generated) exceeds the model's {limit} positions")
    if predictors is not None:
        try:
            predictors.check_compatible(model)
        except ValueError as e:
            raise UserError(f"--predictors {path}: {e}") from None


def _run_needle(args, model, tokenizer, caches) -> dict:
    from aquakv.longctx import (
        Haystack,
        build_tasks,
        format_needle_table,
        run_needle,
        write_heatmaps,
    )

    try:
        haystack = Haystack(tokenizer, _filler_texts(args))
        tasks = build_tasks(tokenizer, args.context, args.depths, args.samples, seed=args.seed, haystack=haystack)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    result = run_needle(model, tokenizer, caches, args.context, args.depths, args.samples, tasks=tasks,
                        prefill_chunk=args.prefill_chunk or None, max_new_tokens=args.max_new_tokens,
                        progress=not args.quiet)
    prefill = f"prefilled {args.prefill_chunk} tokens per forward" if args.prefill_chunk else "one-pass prefill"
    print(f"passkey accuracy, {args.samples} prompt(s) per cell, {prefill}, greedy {args.max_new_tokens} "
          f"tokens:\n")
    print(format_needle_table(result))
    if args.heatmap_dir:
        for path in write_heatmaps(result, args.heatmap_dir):
            log.info("wrote %s", path)
        print(f"\nheatmaps in {args.heatmap_dir}")
    return result.to_dict()


def _run_ppl(args, model, tokenizer, caches) -> dict:
    from dataclasses import asdict

    from aquakv.longctx import evaluate_long_perplexity, format_long_ppl_table

    ids = common.token_ids(tokenizer, args.text, "evaluation")
    if ids.numel() < max(args.context):
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of --context {max(args.context)}")
    rows = []
    for context in args.context:
        prefill = None if args.prefill is None else min(args.prefill, context - 1)
        for name, factory in caches:
            rows.append((name, evaluate_long_perplexity(
                model, ids, factory, window=context, prefill=prefill, chunk=args.chunk, step=args.step,
                max_windows=args.max_windows, progress=not args.quiet, desc=f"{name} @ {context}")))
    r = rows[0][1]
    print(f"perplexity on {r.n_windows} window(s) per context; each window: the first --prefill tokens "
          f"(default all but the last 1024) in chunks of {args.chunk}, then steps of {args.step}; tail = the "
          f"stepped predictions alone:\n")
    print(format_long_ppl_table(rows, baseline=caches[0][0]))
    return {"rows": [{"cache": name, **asdict(r)} for name, r in rows]}


def run_longctx(args: argparse.Namespace) -> int:
    check_model_args(args)
    check_files(args.text, "text file")
    predictors = _load_predictors(args.predictors)
    names = args.caches or (["fp16", "kivi2", "higgs2"] + (["aquakv"] if predictors is not None else []))
    caches = cache_factories(names, predictors, args.attention)
    if args.json is not None and not Path(args.json).parent.is_dir():
        raise UserError(f"--json: directory {Path(args.json).parent} does not exist")
    if args.heatmap_dir and args.task != "needle":
        raise UserError("--heatmap-dir applies to --task needle only")
    if args.heatmap_dir:
        from aquakv.longctx.heatmap import matplotlib_figure

        try:  # before the slow part
            matplotlib_figure()
        except ImportError as e:
            raise UserError(f"--heatmap-dir: {e}") from None
    model, tokenizer = common.load(args)
    _check_model(model, predictors, args.predictors, args.context, args.max_new_tokens if args.task == "needle" else 0)
    for name, factory in caches:  # a cache that cannot serve this model fails here, not after the first rows
        try:
            cache = factory(model)
        except ValueError as e:
            raise UserError(f"--caches {name} cannot serve this model: {e}") from None
        close = getattr(cache, "close", None)
        if callable(close):
            close()
    report = (_run_needle if args.task == "needle" else _run_ppl)(args, model, tokenizer, caches)
    if args.json:
        from aquakv.atomic_writes import write_json_atomic

        write_json_atomic(args.json, {"task": args.task, **report})
        print(f"\nresults saved to {args.json}")
    return 0


def add_longctx(sub) -> None:
    p = sub.add_parser("longctx", help="long-context quality: passkey retrieval and long-window perplexity",
                       description=LONGCTX_DESCRIPTION, epilog=LONGCTX_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--task", choices=("needle", "ppl"), default="needle", help="what to measure (default needle)")
    p.add_argument("--context", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192], metavar="T",
                   help="context lengths in tokens: prompt length (needle) or window (ppl) (default 1024 2048 4096 "
                        "8192)")
    p.add_argument("--caches", nargs="+", metavar="NAME",
                   help="caches to compare, first one the baseline (default fp16 kivi2 higgs2, and aquakv with "
                        "--predictors)")
    p.add_argument("--predictors", metavar="P", help="a .safetensors file from `aquakv calibrate` (for aquakv)")
    p.add_argument("--attention", choices=("materialize", "blockwise"), default="materialize",
                   help="how the compressed caches (kivi, higgs, aquakv) serve attention: hand it every layer's whole "
                        "reconstruction (materialize, the default), or rebuild it block by block inside attention "
                        "(blockwise: memory bounded; the same numbers up to float rounding, except AQUA-KV's chain "
                        "between layers, kept in fp16 there)")
    add_text_option(p, "evaluation")
    g = p.add_argument_group("needle")
    g.add_argument("--depths", type=_depth, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D",
                   help="needle depths as fractions of the filler text (default 0 0.25 0.5 0.75 1)")
    g.add_argument("--filler", choices=("repeat", "docs"), default="repeat",
                   help="haystack without --text: the classic repeated plain sentences (default), or the bundled "
                        "Python docs (real text; harder: a 135M model fails it even with an exact cache)")
    g.add_argument("--samples", type=positive_int, default=3, metavar="N",
                   help="prompts per (length, depth) cell, each with its own key and passage (default 3)")
    g.add_argument("--prefill-chunk", type=_nonnegative_int, default=1024, metavar="N",
                   help="prompt tokens per prefill forward, so the question attends to compressed states; 0: the "
                        "whole prompt in one forward (default 1024)")
    g.add_argument("--max-new-tokens", type=positive_int, default=8, metavar="N",
                   help="greedy tokens generated per answer (default 8)")
    g.add_argument("--heatmap-dir", metavar="DIR", help="write a depth x length heatmap PNG per cache here")
    g = p.add_argument_group("ppl")
    g.add_argument("--prefill", type=_nonnegative_int, metavar="N",
                   help="window tokens fed --chunk at a time (default: all but the last 1024, whole chunks)")
    g.add_argument("--chunk", type=positive_int, default=512, metavar="N", help="tokens per prefill forward (512)")
    g.add_argument("--step", type=positive_int, default=32, metavar="S",
                   help="tokens per forward after the prefill (default 32)")
    g.add_argument("--max-windows", type=positive_int, metavar="N", help="at most this many windows per context")
    p.add_argument("--json", metavar="FILE", help="also save every number (and every answer) as JSON")
    add_common_options(p)
    p.set_defaults(func=run_longctx)
