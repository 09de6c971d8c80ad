"""`aquakv pv-tune`: PV-Tuning of a HIGGS-quantized model from the command line (the work is
aquakv.weights.pv.tune; this module parses, checks what it can before the model load, builds the data-free start
with the quantize-weights pipeline, and writes the results)."""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

from aquakv.cli import common
from aquakv.cli.common import (
    UserError,
    add_common_options,
    add_model_options,
    add_text_option,
    add_weight_target,
    check_files,
    check_model_args,
    finite_positive,
    positive_int,
    power_of_two,
)

DESCRIPTION = """\
Fine-tune a HIGGS-quantized model against its unquantized self (the teacher) with PV-Tuning (docs/pv_tuning.md):
every step accumulates the token-level KL(teacher || student) over --batch-size windows of --window tokens, then
  P step: Adam on the fp32 master copy of the per-group scales (--lr);
  V step: Adam (betas 0, 0.95) on a straight-through fp32 copy W~ of each quantized weight, at a rate that follows
          the training loss (--code-lr-per-nat x the mean KL of the last 5 steps; --code-lr fixes it), then the
          code vectors W~ moved farthest from are re-encoded (at most --max-code-change of them per layer, the
          nearest grid point in the rotated HIGGS domain under the current scales), keeping changes in priority
          order while they move the layer by at most --trust-ratio x ||W|| (at least one change).
--method ste re-encodes every code every step (straight-through estimation); --method p-only tunes the scales only.

The guard: the student's perplexity on validation windows it never trains on (the last --validation-windows
windows of --text, or --validation-text) at the start and every --validate-every steps; every validation worse
than the best halves the code step, a rise past (1 + --stop-rise) x the best stops the run, and the best state is
what is saved (--keep-last saves the last): the saved model is never worse on those windows than its start.

The start is data-free HIGGS (--bits B everywhere, or the DP allocation under --budget, as quantize-weights builds
it; written to OUT/start/). Writes OUT/higgs_weights.safetensors + .json (the tuned model, the quantize-weights
format: load with aquakv.weights.load_quantized on a fresh copy of the base model), OUT/pv_result.json (loss,
codes changed per step, held-out perplexity curve, tokens, wall time), with --plot a PNG of the curves, and with
--checkpoint-every N an atomic checkpoint OUT/checkpoint/pv_checkpoint.pt that --resume continues from.
Held-out perplexity is measured on the bundled evaluation text (or --eval-text), disjoint from the training text.

What to expect (SmolLM2-135M, PV, docs/pv_tuning.md): a step of 2 x 128 tokens takes about 8 s on one idle
thread; on a 2-core CPU shared with other work, 38 s, and 69 s for 4 x 256. The bar (or, in a
redirected log, a line every ~10 s) shows the time left; --plot draws the loss, codes-changed and perplexity
curves, with the guard's validation perplexity. With the defaults, 30 steps of 4 x 256 tokens of a manual took a
3-bit model's perplexity on that project's release notes from 88.3 to 27.5 (the teacher: 19.4).
"""

EPILOG = """\
examples:
  aquakv pv-tune --bits 3 --steps 30 --batch-size 4 --out pv3 --plot pv3/curves.png   # the defaults, 3 bits
  aquakv pv-tune --bits 2 --steps 40 --out pv2 --plot pv2/curves.png          # bundled SmolLM2, bundled text
  aquakv pv-tune --bits 2 --steps 40 --out ste2 --method ste                  # the STE baseline, same compute
  aquakv pv-tune --budget 3.0625 --steps 200 --out pv3 --checkpoint-every 20  # DP start; Ctrl-C, then --resume
"""


def _fraction(text: str) -> float:
    value = finite_positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `pv-tune` on an argparse subparsers object; the parser's default func is `run`."""
    p = subparsers.add_parser("pv-tune", help="PV-Tuning: fine-tune HIGGS codes and scales against the unquantized model",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    add_weight_target(p)
    add_text_option(p, "calibration")
    p.add_argument("--eval-text", nargs="+", metavar="FILE", help="held-out text (default: the bundled evaluation text)")
    p.add_argument("--steps", type=positive_int, required=True, metavar="N", help="optimizer steps in total")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--method", choices=("pv", "ste", "p-only"), default="pv", help="pv (default), ste or p-only")
    p.add_argument("--batch-size", type=positive_int, default=2, help="windows per step (default 2)")
    p.add_argument("--window", type=positive_int, default=256, help="tokens per window (default 256)")
    p.add_argument("--lr", type=finite_positive, default=1e-3, help="Adam learning rate of the scales (default 1e-3)")
    p.add_argument("--code-lr", type=finite_positive, default=None,
                   help="a fixed Adam learning rate of W~ (default: it follows the loss, see --code-lr-per-nat)")
    p.add_argument("--code-lr-per-nat", type=finite_positive, default=None,  # None: pv_tune's default (no torch here)
                   help="the code step per nat of training KL when --code-lr is not given (default 0.0015)")
    p.add_argument("--validation-text", nargs="+", metavar="FILE",
                   help="the guard's validation text (default: the last --validation-windows windows of --text)")
    p.add_argument("--validate-every", type=int, default=5, metavar="N",
                   help="the guard's validation every N steps (default 5; 0 turns the guard off)")
    p.add_argument("--validation-windows", type=positive_int, default=4,
                   help="windows of --text held out for the guard (default 4, at most a quarter of them)")
    p.add_argument("--stop-rise", type=finite_positive, default=0.25,
                   help="stop when validation perplexity exceeds (1 + this) x the best (default 0.25)")
    p.add_argument("--keep-last", action="store_true", help="save the last state, not the best on validation")
    p.add_argument("--max-code-change", type=_fraction, default=0.01,
                   help="largest fraction of a layer's code vectors one V step re-encodes (default 0.01)")
    p.add_argument("--trust-ratio", type=finite_positive, default=0.1,
                   help="a V step moves a layer by at most this x ||W|| (default 0.1; at least one code changes)")
    p.add_argument("--delta-decay", type=_unit_interval, default=0.0,
                   help="after a V step W~ moves this fraction of the way to the new weight (0 keep, 1 reset; default 0)")
    p.add_argument("--tune-norms", action="store_true",
                   help="also tune the RMSNorm weights (P step, --lr); they are saved with the layers")
    p.add_argument("--group-size", type=power_of_two, default=256, help="values per scale (default 256)")
    p.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="held-out perplexity every N steps (always at the start and the end)")
    p.add_argument("--eval-windows", type=positive_int, default=16, help="held-out windows of --window tokens (default 16)")
    p.add_argument("--no-eval", action="store_true", help="no held-out perplexity at all")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="write OUT/checkpoint/pv_checkpoint.pt atomically every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in OUT/checkpoint/")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder block in the backward instead of keeping its activations")
    p.add_argument("--plot", metavar="PNG", help="write the loss / codes / perplexity curves to this PNG")
    add_common_options(p)
    p.set_defaults(func=run)
    return p


def _check_before_load(args: argparse.Namespace) -> None:
    from aquakv.weights.pipeline import check_output_dir, check_weight_options

    check_model_args(args)
    check_files(args.text, "--text file")
    check_files(args.eval_text, "--eval-text file")
    check_files(args.validation_text, "--validation-text file")
    if args.window < 2:
        raise UserError("--window must be at least 2 tokens")
    if args.validate_every < 0:
        raise UserError(f"--validate-every must be 0 (no guard) or a positive number of steps, got {args.validate_every}")
    try:
        check_weight_options(bits=args.bits, budget=args.budget, group_size=args.group_size)
        check_output_dir(args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot {args.plot} must end in .png")
        if not _inside(Path(args.plot).parent, Path(args.out)):  # a directory --out creates is checked with --out
            common.check_out_file(args.plot, "--plot")
    checkpoint = Path(args.out) / "checkpoint" / "pv_checkpoint.pt"
    if checkpoint.is_file() and not args.resume:
        raise UserError(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    if args.resume and not checkpoint.is_file():
        raise UserError(f"--resume: no checkpoint at {checkpoint}")
    args.device = common.resolve_device(args.device)


def _inside(directory: Path, out: Path) -> bool:
    """Whether `directory` is --out itself or lies below it (so it exists once --out is created)."""
    directory, out = directory.resolve(), out.resolve()
    return directory == out or out in directory.parents


def _start(args, model, tokenizer, out: Path):
    """The data-free student: OUT/start/ when it is there (a resumed run), else built with the quantize-weights
    pipeline and written there."""
    from aquakv.weights import load_quantized
    from aquakv.weights.pipeline import quantize_weights

    start = out / "start"
    if not (start / "higgs_weights.json").is_file():
        quantize_weights(model, tokenizer, bits=args.bits, budget=args.budget, out=start, group_size=args.group_size,
                         seed=args.seed, progress=not args.quiet)
    return load_quantized(copy.deepcopy(model), start)


def run(args: argparse.Namespace) -> int:
    """Execute `pv-tune` (the parser's func); user errors raise common.UserError."""
    from aquakv.weights import average_bits, pv_tune, save_quantized
    from aquakv.weights.pv.plot import plot_pv_curves

    _check_before_load(args)
    out = Path(args.out)
    teacher, tokenizer = common.load(args)
    train_ids = common.token_ids(tokenizer, args.text, "calibration")
    eval_ids = None if args.no_eval else common.token_ids(tokenizer, args.eval_text, "evaluation")
    validation = common.token_ids(tokenizer, args.validation_text, "validation") if args.validation_text else None
    extra = {} if args.code_lr_per_nat is None else dict(code_lr_per_nat=args.code_lr_per_nat)
    out.mkdir(parents=True, exist_ok=True)
    student = _start(args, teacher, tokenizer, out)
    result = pv_tune(student, teacher, train_ids, steps=args.steps, batch_size=args.batch_size, window=args.window,
                     lr=args.lr, code_lr=args.code_lr, max_code_change_per_step=args.max_code_change,
                     code_trust_ratio=args.trust_ratio, method=args.method, seed=args.seed, device=args.device,
                     validation=validation, validate_every=args.validate_every or None,
                     validation_windows=args.validation_windows, stop_rise=args.stop_rise, keep_best=not args.keep_last,
                     eval_data=eval_ids, eval_every=args.eval_every, eval_windows=args.eval_windows,
                     checkpoint_dir=out / "checkpoint" if args.checkpoint_every or args.resume else None,
                     checkpoint_every=args.checkpoint_every, resume=args.resume, delta_decay=args.delta_decay,
                     activation_checkpointing=args.activation_checkpointing, tune_norms=args.tune_norms,
                     progress=not args.quiet, **extra)
    save_quantized(student, out)
    from aquakv.atomic_writes import write_json_atomic

    summary = dict(method=result.method, steps=result.steps, tokens=result.tokens, seconds=result.seconds,
                   average_bits=average_bits(student), loss=result.loss, codes_changed=result.codes_changed,
                   code_lr=result.code_lr, n_codes=result.n_codes, eval_steps=result.eval_steps,
                   eval_ppl=result.eval_ppl, val_steps=result.val_steps, val_ppl=result.val_ppl,
                   val_start=result.val_start, val_final=result.val_final, best_step=result.best_step,
                   stopped=result.stopped, resumed_from=result.resumed_from,
                   settings={k: v for k, v in vars(args).items() if k != "func"})
    write_json_atomic(out / "pv_result.json", summary)
    if args.plot:
        plot_pv_curves({args.method: result}, args.plot, title=f"pv-tune {args.method}")
    for line in summary_lines(result):
        print(line)
    print(f"saved {out}/: {average_bits(student):.4f} bits/weight")
    return 0


def summary_lines(result) -> list[str]:
    """What the run did, for the terminal: steps and time per step, the validation perplexity from the start to
    the model saved, the held-out curve's ends, and why it stopped early if it did."""
    if not result.loss:
        return ["no step run"]
    lines = [f"{result.method}: {result.steps} steps, {result.tokens} tokens, {result.seconds:.0f} s "
             f"({result.seconds / result.steps:.1f} s per step, evaluations included); final loss {result.loss[-1]:.4f}"]
    if result.val_start is not None:
        lines.append(f"validation perplexity {result.val_start:.3f} at the start -> {result.val_final:.3f} saved "
                     f"(the state of step {result.best_step})")
    if result.eval_ppl and all(math.isfinite(p) for p in result.eval_ppl):
        lines.append(f"held-out perplexity {result.eval_ppl[0]:.3f} at the start -> {result.eval_ppl[-1]:.3f} "
                     f"after step {result.eval_steps[-1]}")
    if result.stopped:
        lines.append(f"stopped early: {result.stopped}")
    return lines
