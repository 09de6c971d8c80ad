"""`aquakv quantize-weights`: HIGGS weight quantization from the command line (wired into aquakv.cli)."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = """\
Quantize a model's linear layers with HIGGS (data-free: random Hadamard rotation + MSE-optimal Gaussian grid,
one fp16 scale per group), either at the same bit width everywhere (--bits) or with a per-layer bit width chosen
by dynamic programming under an average budget (--budget, DESIGN §4): every layer's sensitivity is measured by
adding Gaussian noise to it alone on calibration text, and the DP minimises the predicted loss increase.
Embeddings and the output head stay in full precision unless --include-lm-head.

Writes OUT/higgs_weights.safetensors + OUT/higgs_weights.json (load with aquakv.weights.load_quantized on a
fresh copy of the same model), OUT/sensitivities.json (reusable with --sensitivities), and with --eval
OUT/results.json. Bits per weight always include the fp16 group scales. The bundled model is a Q4_1 GGUF:
its "unquantized" reference is the dequantized Q4_1 weights in fp32.
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
    p.add_argument("--model", metavar="DIR", help="local transformers checkpoint or directory holding --gguf "
                   "(default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--gguf", metavar="FILE", help="GGUF file name inside --model (GGUF weights are dequantized to fp32 on load)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--bits", type=float, metavar="B", help="uniform HIGGS code bits per weight (a shipped grid width: 2, 3, 4, 8, ...)")
    target.add_argument("--budget", type=float, metavar="AVG_BITS",
                        help="average bits per weight INCLUDING scales (3 bits at group 256 cost 3.0625) for the DP allocation")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--group-size", type=int, default=256, help="values per scale and Hadamard block (power of two; default 256)")
    p.add_argument("--device", default="cpu", help="torch device for quantization and evaluation (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random Hadamard sign seed (default 0)")
    p.add_argument("--include-lm-head", action="store_true", help="also quantize the output head")
    p.add_argument("--min-bits", type=float, default=2.0, help="smallest candidate grid width for the DP (default 2)")
    p.add_argument("--max-bits", type=float, default=8.0, help="largest candidate grid width for the DP (default 8)")
    p.add_argument("--sensitivities", metavar="FILE", help="reuse a sensitivities.json from an earlier run instead of measuring")
    p.add_argument("--noise", type=float, default=0.01, help="relative MSE t^2 of the noise injected per layer (default 0.01)")
    p.add_argument("--calib-windows", type=int, default=4, help="calibration windows for sensitivities (default 4)")
    p.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--eval", action="store_true",
                   help="print perplexity on held-out text for: unquantized, RTN at the same bits, HIGGS uniform, HIGGS + DP")
    p.add_argument("--eval-window", type=int, default=1024, help="tokens per evaluation window (default 1024)")
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many evaluation windows (default: all)")
    p.set_defaults(func=run)
    return p


def _uniform_bits_within(budget: float, widths: list[float], group_size: int) -> float:
    fitting = [b for b in widths if b + 16.0 / group_size <= budget + 1e-9]
    if not fitting:
        raise SystemExit(f"quantize-weights: --budget {budget} is below every uniform HIGGS width "
                         f"({min(widths) + 16.0 / group_size:.4f} bits/weight at --group-size {group_size})")
    return max(fitting)


def run(args: argparse.Namespace) -> int:
    """Execute `quantize-weights` (the parser's func); returns the exit status 0. User errors raise SystemExit(message)."""
    quantize_weights(args)
    return 0


def quantize_weights(args: argparse.Namespace) -> dict:
    """The work of `quantize-weights`; returns the results dict (also written to OUT/results.json with --eval)."""

    from aquakv.data import default_texts, tokenize
    from aquakv.grids import available_grids
    from aquakv.models import load_model
    from aquakv.weights import (
        InfeasibleBudget,
        Sensitivities,
        allocate_bits,
        average_bits,
        candidate_grids,
        default_grid,
        measure_layer_errors,
        measure_sensitivities,
        perplexity,
        predicted_delta_nll,
        quantize_model,
        rtn_bits_per_weight,
        rtn_quantize_model,
        save_quantized,
        split_windows,
    )
    from aquakv.weights.linear import grid_bits

    if args.model is not None and not Path(args.model).is_dir():
        raise SystemExit(f"quantize-weights: --model directory not found: {args.model}")
    if args.sensitivities is not None and not Path(args.sensitivities).is_file():
        raise SystemExit(f"quantize-weights: --sensitivities file not found: {args.sensitivities}")
    group = args.group_size
    if group < 2 or group & (group - 1):
        raise SystemExit(f"quantize-weights: --group-size {group} is not a power of two")
    if args.bits is not None:
        try:
            default_grid(args.bits)
        except ValueError as e:
            raise SystemExit(f"quantize-weights: --bits {args.bits}: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model(args.model, args.gguf, device=args.device)
    need_dp = args.budget is not None or args.eval
    results: dict = {"model": args.model or "bundled SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
                     "group_size": group, "seed": args.seed, "rows": []}

    table = sens = None
    if need_dp:
        grids = candidate_grids(args.min_bits, args.max_bits)
        log.info("candidate grids (dim, n): %s (shipped: %s)", grids, available_grids())
        t0 = time.perf_counter()
        table = measure_layer_errors(model, grids, group_size=group, seed=args.seed, include_lm_head=args.include_lm_head)
        results["layer_errors_seconds"] = time.perf_counter() - t0
        if args.sensitivities:
            sens = Sensitivities.load(args.sensitivities)
        else:
            calib = split_windows(tokenize(tokenizer, default_texts("calibration")), args.calib_len, args.calib_windows)
            sens = measure_sensitivities(model, calib, noise=args.noise, seed=args.seed, include_lm_head=args.include_lm_head)
            sens.save(out / "sensitivities.json")
            log.info("sensitivities: %d layers in %.0f s (%s)", len(sens.names), sens.seconds, sens.method)
        results["sensitivities"] = dict(noise=sens.noise, windows=sens.windows, window_len=sens.window_len,
                                        seconds=sens.seconds, method=sens.method)
        alpha = sens.for_layers(table.names)

    widths = sorted({grid_bits(*g) for g in available_grids()})
    if args.bits is not None:
        uniform_bits = args.bits
        budget = args.bits + 16.0 / group
    else:
        budget = args.budget
        uniform_bits = _uniform_bits_within(budget, [w for w in widths if args.min_bits <= w <= args.max_bits], group)
    allocation = None
    if need_dp:
        try:
            allocation = allocate_bits(table, sens, budget)
        except InfeasibleBudget as e:
            raise SystemExit(f"quantize-weights: --budget: {e}") from None

    eval_ids = tokenize(tokenizer, default_texts("evaluation")) if args.eval else None

    def evaluate(name: str, m, bits: float, predicted_dnll: float | None) -> None:
        res = perplexity(m, eval_ids, args.eval_window, args.eval_windows, desc=name)
        row = dict(method=name, bits_per_weight=bits, perplexity=res.perplexity, nll=res.nll, seconds=res.seconds)
        if predicted_dnll is not None:
            row["predicted_perplexity"] = results["rows"][0]["perplexity"] * math.exp(predicted_dnll)
        results["rows"].append(row)
        log.info("%s: %s", name, res)

    def higgs(bits: float | None = None, grid_per_layer: dict | None = None):
        # Quantize a copy: the unquantized model stays available for the other rows.
        return quantize_model(copy.deepcopy(model), bits, grid_per_layer=grid_per_layer, group_size=group,
                              seed=args.seed, include_lm_head=args.include_lm_head)

    uniform_model = dp_model = None
    if args.eval:
        evaluate("unquantized (fp32)", model, 32.0, None)
        rtn_bits = int(math.floor(uniform_bits))
        evaluate(f"RTN {rtn_bits}-bit", rtn_quantize_model(copy.deepcopy(model), rtn_bits, group, args.include_lm_head),
                 rtn_bits_per_weight(rtn_bits, group), None)
        grid = default_grid(uniform_bits)
        uniform_model = higgs(uniform_bits)
        evaluate(f"HIGGS {uniform_bits:g}-bit d{grid[0]}_n{grid[1]}", uniform_model, average_bits(uniform_model),
                 predicted_delta_nll(table, alpha, table.uniform_choice(grid)) if grid in table.grids else None)
        dp_model = higgs(grid_per_layer=allocation.grid_per_layer)
        evaluate(f"HIGGS + DP (budget {budget:g})", dp_model, average_bits(dp_model), allocation.predicted_delta_nll)

    if args.budget is not None:
        target = dp_model or higgs(grid_per_layer=allocation.grid_per_layer)
    else:
        target = uniform_model or higgs(uniform_bits)
    save_quantized(target, out)
    if allocation is not None:
        (out / "allocation.json").write_text(json.dumps(
            dict(budget_bits=budget, average_bits=allocation.average_bits, predicted_delta_nll=allocation.predicted_delta_nll,
                 histogram=allocation.histogram(), grid_per_layer=allocation.grid_per_layer), indent=1))
        results["allocation"] = allocation.histogram()
    if args.eval:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(format_table(results))
    print(f"saved {out}/: {average_bits(target):.4f} bits/weight over the quantized linears "
          f"({'DP allocation' if args.budget is not None else f'uniform {uniform_bits:g}-bit'})")
    return results


def format_table(results: dict) -> str:
    """Markdown table of the --eval rows."""
    base = results["rows"][0]["perplexity"]
    lines = ["| method | bits/weight | perplexity | vs unquantized | predicted ppl |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        predicted = f"{r['predicted_perplexity']:.3f}" if "predicted_perplexity" in r else ""
        rel = f"{100 * (r['perplexity'] / base - 1):+.2f}%"
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.4f} | {r['perplexity']:.3f} | {rel} | {predicted} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry (python -m aquakv.cli.weights ...), for use before aquakv.cli wires it in."""
    parser = argparse.ArgumentParser(prog="aquakv")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
