"""`aquakv generate`: a fully compressed model end to end. HIGGS weights served from their codes
(torch.ops.aquakv.higgs_linear) plus an AQUA-KV cache, beside the float32 model with its fp16 cache.

For each of the two it prefills a --context-token window of held-out text, generates --new-tokens greedily, and
reports decode tokens/s, peak RSS over the phase, and the bytes held by the weights and by the KV cache. A middle
row runs the quantized weights with the fp16 cache, so that the weights' speed and the cache's show apart. With
--check-ppl it also compares the quantized model's perplexity served from codes with the same model served
from its dequantized weights (F.linear on dequantize_weight()).

  aquakv quantize-weights --bits 4 --out q4 && aquakv calibrate --bits 2 --out p2.pt
  aquakv generate --weights q4 --predictors p2.pt --context 1024 --new-tokens 64 --check-ppl
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

EPILOG = __doc__.split("\n\n", 1)[1]


def add_generate(subparsers) -> None:
    """Register `generate` on an argparse subparsers object; the parser's default func is `run`."""
    from aquakv.cli.common import add_common_options, positive_int

    p = subparsers.add_parser("generate", help="generate with HIGGS weights from codes and an AQUA-KV cache",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="DIR", help="output directory of `aquakv quantize-weights`")
    p.add_argument("--predictors", metavar="FILE",
                   help="AQUA-KV predictors from `aquakv calibrate` (default: calibrate 2-bit ones here, ~1 min)")
    p.add_argument("--context", type=positive_int, default=1024, help="prefilled tokens (default 1024)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens generated (default 32)")
    p.add_argument("--check-ppl", action="store_true",
                   help="also compare perplexity from codes with the dequantized weights on the prefill window")
    p.add_argument("--no-baseline", action="store_true", help="skip the float32 model with the fp16 cache")
    add_common_options(p)
    p.set_defaults(func=run)


def _rss_peak_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: /proc/self/clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _weight_bytes(model) -> int:
    """Bytes of every parameter and buffer the model holds (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _decode(model, ids, cache, new_tokens: int) -> tuple[float, float, list[int]]:
    """Prefill ids, then greedy decode; returns (prefill seconds, decode tokens/s, the tokens)."""
    import torch

    from aquakv.hf_compat import cache_kwargs

    kw = cache_kwargs(model, cache)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(ids, **kw, use_cache=True).logits[:, -1]
        prefill = time.perf_counter() - t0
        tokens, t1 = [], time.perf_counter()
        for _ in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            logits = model(nxt, **kw, use_cache=True).logits[:, -1]
        return prefill, new_tokens / (time.perf_counter() - t1), tokens


def _perplexity(model, ids) -> float:
    import torch

    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())


def run(args) -> int:
    import torch

    from aquakv.cli.common import UserError
    from aquakv.data import default_texts, tokenize
    from aquakv.evaluation.accounting import cache_nbytes
    from aquakv.kv import AquaKVCache, AquaKVPredictors, calibrate
    from aquakv.kv.baselines import Fp16Cache
    from aquakv.models import load_model
    from aquakv.weights import HiggsLinear, load_quantized

    if torch.device(args.device).type != "cpu":
        raise UserError(f"--device {args.device}: higgs_linear has a CPU kernel only so far; use --device cpu")
    from aquakv.weights.checkpoint import METADATA_FILE

    if not (Path(args.weights) / METADATA_FILE).is_file():
        raise UserError(f"--weights {args.weights}: no {METADATA_FILE} there (give an output directory of "
                        f"`aquakv quantize-weights`)")
    if args.predictors and not Path(args.predictors).is_file():
        raise UserError(f"--predictors {args.predictors}: not a file (give the output of `aquakv calibrate`)")
    model, tokenizer = load_model(device="cpu")
    model.eval()
    held_out = tokenize(tokenizer, default_texts("evaluation"))
    if held_out.numel() < args.context:
        raise UserError(f"--context {args.context}: the held-out text has only {held_out.numel()} tokens")
    ids = held_out[: args.context].view(1, -1)
    if args.predictors:
        preds = AquaKVPredictors.load(args.predictors)
    else:
        print("calibrating AQUA-KV-2 predictors (pass --predictors FILE from `aquakv calibrate` to skip) ...",
              flush=True)
        calib = tokenize(tokenizer, default_texts("calibration"))
        preds = calibrate(model, [calib], bits=2, window=512, max_windows=4, seed=args.seed,
                          progress=not args.quiet)  # a minute or more on a loaded CPU: show it

    rows = []
    if not args.no_baseline:
        _rss_peak_reset()
        cache = Fp16Cache(model)
        prefill, tps, base_tokens = _decode(model, ids, cache, args.new_tokens)
        rows.append(("float32 weights, fp16 cache", _weight_bytes(model), cache_nbytes(cache), tps, prefill,
                     _rss_peak_bytes()))
    try:
        load_quantized(model, args.weights)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    layers = [m for m in model.modules() if isinstance(m, HiggsLinear)]
    weights = f"HIGGS weights ({len(layers)} layers, from codes)"
    for cache in (Fp16Cache(model), AquaKVCache(model, preds)):
        _rss_peak_reset()
        prefill, tps, q_tokens = _decode(model, ids, cache, args.new_tokens)
        name = "fp16 cache" if isinstance(cache, Fp16Cache) else f"{type(cache).__name__}-{preds.settings.bits:g}"
        rows.append((f"{weights}, {name}", _weight_bytes(model), cache_nbytes(cache), tps, prefill, _rss_peak_bytes()))

    mib = 2.0**20
    print(f"\ncontext {args.context} tokens, {args.new_tokens} new tokens (greedy), {torch.get_num_threads()} "
          f"threads\n")
    print("| model | weights MiB | KV cache MiB | decode tokens/s | prefill s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, wb, kb, tps, pre, rss in rows:
        kv = "n/a" if kb is None else f"{kb / mib:.2f}"
        print(f"| {name} | {wb / mib:.1f} | {kv} | {tps:.2f} | {pre:.2f} | {rss / mib:.0f} |")
    if len(rows) == 3:
        print(f"\nquantized / float32: weights {rows[2][1] / rows[0][1]:.3f}x; decode speed {rows[2][3] / rows[0][3]:.2f}x, "
              f"of which the weights alone (fp16 cache both) {rows[1][3] / rows[0][3]:.2f}x; first "
              f"{min(8, args.new_tokens)} tokens {'agree' if q_tokens[:8] == base_tokens[:8] else 'differ'}")
    if args.check_ppl:
        from_codes = _perplexity(model, ids)
        for m in layers:  # the same layers served from their dequantized weights
            m.forward = (lambda layer: lambda x: torch.nn.functional.linear(
                x.to(layer.compute_dtype), layer.dequantize_weight(), layer.bias))(m)
        dense = _perplexity(model, ids)
        print(f"\nperplexity on the prefill window: from codes {from_codes:.6f}, dequantized weights {dense:.6f} "
              f"(relative difference {abs(from_codes - dense) / dense:.2e})")
    return 0
