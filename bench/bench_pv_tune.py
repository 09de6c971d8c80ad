"""PV-Tuning against its baselines on one start, at equal steps and tokens: held-out perplexity, curves, wall time.

    python bench/bench_pv_tune.py --bits 2 --steps 40 --out runs/pv2                # p-only, ste, pv
    python bench/bench_pv_tune.py --budget 3.0625 --steps 40 --out runs/pvdp3       # the DP allocation at 3 bits
    python bench/bench_pv_tune.py --bits 2 --steps 8 --methods ste pv --code-lr 1e-2 1e-3 1e-4 --out runs/sweep
    python bench/bench_pv_tune.py --bits 3 --steps 30 --batch-size 4 --window 256 --methods pv \
        --text manual.txt --eval-text release_notes.txt --eval-window 1024 --eval-windows 6 --out runs/t3

Teacher: the bundled SmolLM2-135M (or --model). The start is data-free HIGGS built by the quantize-weights
pipeline (--bits, or the DP allocation under --budget; written to OUT/start/, or read from --start). Every method
trains from a fresh copy of that start on the same batches (seeded: windows of the bundled calibration text),
so rows differ only in what the method does. Two disjoint slices of the bundled evaluation text are scored:
  held-out   the first --eval-windows windows of --eval-window tokens: the reported perplexity (the data-free
             start, every --eval-every steps and the end);
  selection  --selection-windows windows starting at token --selection-offset: scored at the end of every run
             only, so a hyperparameter (--code-lr, one value or several) is chosen without looking at held-out.
--code-lr takes values for both ste and pv ("1e-3") or for one ("ste=1e-3"); several values sweep, and every
value runs each method identically; "auto" (the default) is pv_tune's own: the code step follows the training
loss. Every run has pv_tune's validation guard (its default: 4 windows held out of the training text, every 5
steps) unless --no-guard. --text / --eval-text replace the bundled calibration / evaluation texts. Writes OUT/pv_bench.json (settings, teacher and data-free perplexity, every
run's curves, tokens and wall time) and OUT/pv_curves.png. Run with OMP_NUM_THREADS=1 on a shared CPU;
--device cuda trains the student on a GPU.

    python bench/bench_pv_tune.py --plot-from runs/dp3 runs/dp3_ste --out runs/dp3_all   # one PNG, no training

--plot-from redraws the curves of several runs of the same start (their OUT directories) into OUT/pv_curves.png.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def _code_lrs(entries: list[str], methods: list[str]) -> dict[str, list[float]]:
    """'1e-3' -> every code method; 'ste=1e-3' -> that one. Returns method -> values in the given order."""
    out: dict[str, list[float]] = {m: [] for m in methods if m != "p-only"}
    for entry in entries:
        name, _, value = entry.rpartition("=")
        targets = [name] if name else list(out)
        if name and name not in out:
            raise SystemExit(f"--code-lr {entry}: {name!r} is not one of the code-changing methods run {list(out)}")
        if value == "auto":  # None: the V step's rate follows the training loss (pv_tune's default)
            lr = None
        else:
            try:
                lr = float(value)
            except ValueError:
                raise SystemExit(f"--code-lr {entry}: not a number or 'auto'") from None
            if not lr > 0 or lr == float("inf"):
                raise SystemExit(f"--code-lr {entry}: must be a finite positive number or 'auto'")
        for m in targets:
            if lr not in out[m]:
                out[m].append(lr)
    for m, values in out.items():
        if not values:
            raise SystemExit(f"--code-lr gives no value for {m}")
    return out


def _lr_name(code_lr: float | None) -> str:
    return "auto" if code_lr is None else f"{code_lr:g}"


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required="--plot-from" not in argv)  # redrawing needs no target
    target.add_argument("--bits", type=float, help="uniform HIGGS code bits per weight (a shipped grid width)")
    target.add_argument("--budget", type=float, help="average bits per weight for the DP allocation (scales included)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--start", help="a quantize-weights output directory to start from (default: build OUT/start/)")
    p.add_argument("--model", help="teacher checkpoint directory (default: the bundled SmolLM2-135M)")
    p.add_argument("--methods", nargs="+", choices=("p-only", "ste", "pv"), default=["p-only", "ste", "pv"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--window", type=int, default=128, help="training tokens per window")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam on the scales (every method)")
    p.add_argument("--code-lr", nargs="+", default=["auto"], metavar="[METHOD=]LR",
                   help="Adam on W~ for ste and pv (several values: a sweep); 'auto' (default): pv_tune's default, "
                        "the rate follows the training loss")
    p.add_argument("--code-lr-per-nat", type=float, default=None, help="pv_tune's code_lr_per_nat (default: its own)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="training text (default: the bundled calibration text)")
    p.add_argument("--eval-text", nargs="+", metavar="FILE",
                   help="held-out and selection text (default: the bundled evaluation text)")
    p.add_argument("--no-guard", action="store_true", help="train without pv_tune's validation guard")
    p.add_argument("--validate-every", type=int, default=5, help="the guard's interval in steps (default 5)")
    p.add_argument("--max-code-change", type=float, default=0.01)
    p.add_argument("--trust-ratio", type=float, default=0.1)
    p.add_argument("--delta-decay", type=float, default=0.0)
    p.add_argument("--eval-window", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=None, help="default: steps / 4")
    p.add_argument("--selection-offset", type=int, default=8192)
    p.add_argument("--selection-windows", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where the student trains (default: where it loads, the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--plot-from", nargs="+", metavar="DIR", help="only redraw the curves of these runs' OUT dirs")
    return p


def _plot_from(dirs: list[str], out: Path) -> int:
    """One PNG of the runs in several pv_bench.json files, which must share their data-free start."""
    import json

    from aquakv.weights.pv.plot import plot_pv_curves
    from aquakv.weights.pv.tune import PVTuneResult

    missing = [d for d in dirs if not (Path(d) / "pv_bench.json").is_file()]
    if missing:
        raise SystemExit(f"--plot-from: no pv_bench.json in {', '.join(missing)} (each DIR is the --out of an earlier "
                         "bench_pv_tune.py run)")
    reports = [json.loads((Path(d) / "pv_bench.json").read_text()) for d in dirs]
    if len({round(r["data_free"]["held_out"], 6) for r in reports}) != 1:
        raise SystemExit("--plot-from: the runs do not share a data-free start (their data-free perplexities differ)")
    runs = {}
    for r in reports:
        for x in r["runs"]:
            label = x["label"]
            runs[label] = PVTuneResult(method=x["method"], steps=x["steps"], tokens=x["tokens"], seconds=x["seconds"],
                                       loss=x["loss"], codes_changed=x["codes_changed"], eval_steps=x["eval_steps"],
                                       eval_ppl=x["eval_ppl"], n_codes=x["n_codes"])
    s = reports[0]["settings"]
    target = f"{s['bits']:g} bits" if s["bits"] is not None else f"DP allocation, budget {s['budget']:g}"
    out.mkdir(parents=True, exist_ok=True)
    plot_pv_curves(runs, out / "pv_curves.png", baseline_ppl=reports[0]["teacher"]["held_out"],
                   title=f"SmolLM2-135M, {target}: {s['steps']} steps x {s['batch_size']} x {s['window']} tokens")
    print(f"wrote {out / 'pv_curves.png'} ({len(runs)} runs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv).parse_args(argv)
    if args.plot_from:
        return _plot_from(args.plot_from, Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    from aquakv.data import default_texts, tokenize
    from aquakv.evaluation.perplexity import evaluate_perplexity
    from aquakv.models import load_model
    from aquakv.weights import average_bits, load_quantized
    from aquakv.weights.pipeline import quantize_weights
    from aquakv.weights.pv.plot import plot_pv_curves
    from aquakv.weights.pv.tune import pv_tune
    from aquakv.atomic_writes import write_json_atomic

    code_lrs = _code_lrs(args.code_lr, args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tok = load_model(args.model) if args.model else load_model()
    teacher.eval()
    def read(files):
        return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]

    train = tokenize(tok, read(args.text) if args.text else default_texts("calibration"))
    evaluation = tokenize(tok, read(args.eval_text) if args.eval_text else default_texts("evaluation"))
    held_out = evaluation[: args.eval_windows * args.eval_window]
    selection = evaluation[args.selection_offset: args.selection_offset + args.selection_windows * args.eval_window]
    if args.selection_offset < held_out.numel() or selection.numel() < args.selection_windows * args.eval_window:
        raise SystemExit(f"the selection slice must lie after the held-out one and inside the evaluation text "
                         f"({evaluation.numel()} tokens)")

    def ppl(model, ids) -> float:
        return evaluate_perplexity(model, ids, window=args.eval_window, step=None, progress=False).ppl

    start_dir = Path(args.start) if args.start else out / "start"
    t0 = time.perf_counter()
    if not (start_dir / "higgs_weights.json").is_file():
        quantize_weights(teacher, tok, bits=args.bits, budget=args.budget, out=start_dir, seed=args.seed,
                         progress=args.progress)
    start = load_quantized(copy.deepcopy(teacher), start_dir)
    start_seconds = time.perf_counter() - t0
    report = dict(
        command="python " + shlex.join(sys.argv), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        machine=f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads" if args.device in (None, "cpu")
        else str(args.device), torch=torch.__version__, settings=vars(args), start_dir=str(start_dir),
        start_seconds=start_seconds, average_bits=average_bits(start), train_tokens_available=train.numel(),
        held_out_tokens=held_out.numel(), selection_tokens=selection.numel(),
        teacher=dict(held_out=ppl(teacher, held_out), selection=ppl(teacher, selection)),
        data_free=dict(held_out=ppl(start, held_out), selection=ppl(start, selection)), runs=[])
    logging.info("teacher %s, data-free %s (%.4f bits/weight)", report["teacher"], report["data_free"],
                 report["average_bits"])
    results = {}
    plan = [(m, None) for m in args.methods if m == "p-only"] + [
        (m, lr) for m in args.methods if m != "p-only" for lr in code_lrs[m]]
    for method, code_lr in plan:
        label = method if len(code_lrs.get(method, [None])) == 1 else f"{method} code_lr={_lr_name(code_lr)}"
        student = copy.deepcopy(start)
        extra = {} if args.code_lr_per_nat is None else dict(code_lr_per_nat=args.code_lr_per_nat)
        r = pv_tune(student, teacher, train, steps=args.steps, batch_size=args.batch_size, window=args.window,
                    lr=args.lr, code_lr=code_lr, validate_every=None if args.no_guard else args.validate_every, **extra,
                    max_code_change_per_step=args.max_code_change, code_trust_ratio=args.trust_ratio,
                    delta_decay=args.delta_decay, method=method, seed=args.seed, device=args.device,
                    eval_data=held_out, eval_window=args.eval_window, eval_every=args.eval_every or max(1, args.steps // 4),
                    progress=args.progress)
        run = dict(label=label, method=method, code_lr=code_lr, steps=r.steps, tokens=r.tokens, seconds=r.seconds,
                   held_out=r.eval_ppl[-1], selection=ppl(student, selection), loss=r.loss,
                   codes_changed=r.codes_changed, n_codes=r.n_codes, eval_steps=r.eval_steps, eval_ppl=r.eval_ppl,
                   code_lr_per_step=r.code_lr, val_steps=r.val_steps, val_ppl=r.val_ppl, best_step=r.best_step,
                   stopped=r.stopped)
        report["runs"].append(run)
        results[label] = r
        logging.info("%s: held-out %.3f, selection %.3f, %d steps, %d tokens, %.0f s", label, run["held_out"],
                     run["selection"], r.steps, r.tokens, r.seconds)
        write_json_atomic(out / "pv_bench.json", report)  # after every run: a stopped bench keeps what it did
        del student
    target = f"{args.bits:g} bits" if args.bits is not None else f"DP allocation, budget {args.budget:g}"
    plot_pv_curves(results, out / "pv_curves.png", baseline_ppl=report["teacher"]["held_out"],
                   title=f"SmolLM2-135M, {target}: {args.steps} steps x {args.batch_size} x {args.window} tokens")
    for method in code_lrs:
        runs = [r for r in report["runs"] if r["method"] == method]
        if len(runs) > 1:
            best = min(runs, key=lambda r: r["selection"])
            logging.info("%s: code_lr %s has the lowest selection perplexity (%.3f)", method, _lr_name(best["code_lr"]),
                         best["selection"])
    print(f"\n| method | code_lr | held-out ppl | vs teacher | selection ppl | steps | tokens | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    t = report["teacher"]
    print(f"| teacher | - | {t['held_out']:.2f} | - | {t['selection']:.2f} | - | - | - |")
    d = report["data_free"]
    print(f"| data-free | - | {d['held_out']:.2f} | {d['held_out'] / t['held_out']:.2f}x | {d['selection']:.2f} "
          f"| 0 | 0 | - |")
    for r in report["runs"]:
        print(f"| {r['method']} | {'-' if r['method'] == 'p-only' else _lr_name(r['code_lr'])} | {r['held_out']:.2f} "
              f"| {r['held_out'] / t['held_out']:.2f}x | {r['selection']:.2f} | {r['steps']} | {r['tokens']} "
              f"| {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
