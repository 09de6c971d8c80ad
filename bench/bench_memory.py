"""Peak memory each KV cache really adds during prefill + decode, every cache measured in a fresh process.

    python bench/bench_memory.py --contexts 1024 4096 8192 --threads 2        # bundled SmolLM2-135M, CPU
    python bench/bench_memory.py --device cuda --random-weights --shape 8b    # Llama-3-8B-like shape, no model file

Per (context, cache) the parent starts `python bench/bench_memory.py --child ...`, which loads the model, runs one
16-token warm-up forward without a cache, records the memory baseline, prefills the context through the cache in
pieces of --chunk tokens (only the last position's logits are computed, as a server does), then decodes --tokens
tokens greedily one at a time, and prints one JSON line. "peak added" is the peak over that baseline:
  CPU:  VmHWM - VmRSS at the baseline, with VmHWM reset at the baseline by writing "5" to /proc/self/clear_refs
        (freed heap is handed back with malloc_trim first, so the baseline does not hide reusable free memory);
        where the reset is refused the peak includes the load and the row says so.
  CUDA: torch.cuda.max_memory_allocated() - memory_allocated() at the baseline, after reset_peak_memory_stats().
The peak includes the model's own activations (the same for every cache) and whatever the cache builds while it
serves a forward; "held" is the cache's own nbytes() at the end (summed tensor bytes for a DynamicCache), and
"transient" = peak added - held. AQUA-KV's predictors come from --predictors (a file of `aquakv calibrate --bits 2
--out FILE`) or from a quick calibration in the parent on four 512-token windows of the calibration text (random
tokens with --random-weights), saved to a temporary file; memory does not depend on how well they fit.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache import DTYPES, SHAPES, load  # noqa: E402
from common import print_header  # noqa: E402

CACHES = {"fp16": "fp16 (Fp16Cache)", "dynamic": "DynamicCache (model dtype)", "aqua-kv-2": "AQUA-KV-2",
          "higgs-2": "HIGGS-2", "kivi-2": "KIVI-2", "aqua-kv-2-bw": "AQUA-KV-2, blockwise attention",
          "higgs-2-bw": "HIGGS-2, blockwise attention", "kivi-2-bw": "KIVI-2, blockwise attention"}
BLOCKWISE = "-bw"  # suffix: the same cache with attention="blockwise" (rebuilt block by block inside attention)
MiB = 2 ** 20


# ---- the model and the caches ---------------------------------------------------------------------------------
def load_model_and_text(random_weights: bool, shape: str, device: str, dtype: str, seed: int, context: int):
    """(model, token ids [>= context]): bench_cache's model (the bundled SmolLM2 and held-out text, or `shape` with
    random weights and random tokens) in `dtype`."""
    model, text = load(random_weights, device, seed, shape, dtype)
    if text.numel() < context:
        raise SystemExit(f"--context {context}: the text has only {text.numel()} tokens")
    return model, text


def build_cache(name: str, model, predictors: str | None, seed: int):
    from aquakv.kv import AquaKVCache, AquaKVPredictors, HiggsCache, KiviCache
    from aquakv.kv.baselines import Fp16Cache

    attention = "materialize"
    if name.endswith(BLOCKWISE):
        name, attention = name[:-len(BLOCKWISE)], "blockwise"
    if name == "fp16":
        return Fp16Cache(model)
    if name == "dynamic":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    if name == "aqua-kv-2":
        if predictors is None:
            raise SystemExit("--cache aqua-kv-2 needs --predictors FILE")
        return AquaKVCache(model, AquaKVPredictors.load(predictors), attention=attention)
    if name == "higgs-2":
        return HiggsCache(model, 2, seed=seed, attention=attention)
    if name == "kivi-2":
        return KiviCache(model, 2, attention=attention)
    raise SystemExit(f"--cache: unknown cache {name!r}; choose from {', '.join(CACHES)}")


def quick_predictors(args, path: str) -> str:
    """Calibrate AQUA-KV-2 predictors once on four 512-token windows and save them to `path`; says where from."""
    from aquakv.kv import calibrate

    if args.random_weights:
        model, text = load_model_and_text(True, args.shape, args.device, args.dtype, args.seed, 0)
        source = "random tokens"
    else:
        from aquakv.data import default_texts, tokenize
        from aquakv.models import load_model

        model, tokenizer = load_model(device=args.device)
        model = model.to(DTYPES[args.dtype])
        text = tokenize(tokenizer, default_texts("calibration"))  # disjoint from the measured (evaluation) text
        source = "the calibration split of the bundled text"
    preds = calibrate(model, [text[:2048]], bits=2, window=512, seed=args.seed, progress=False)
    preds.save(path)
    del model, preds
    gc.collect()
    return f"calibrated in the parent on 4 x 512 tokens of {source} (temporary file)"


# ---- the child: one cache, one context ------------------------------------------------------------------------
class PeakMemory:
    """Peak memory over a baseline: VmHWM / VmRSS on the CPU, the CUDA caching allocator's counters on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.note = ""
        self.baseline = 0

    @staticmethod
    def _status_bytes(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.note = "max_memory_allocated - memory_allocated at the baseline"
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.baseline = self._status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.note = "VmHWM (reset at the baseline) - VmRSS at the baseline"
            if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
                self.note += f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
        except OSError as error:
            self.note = f"VmHWM NOT reset ({error.strerror}): the peak includes the load; VmHWM - VmRSS at the baseline"

    def peak_added(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return self._status_bytes("VmHWM") - self.baseline

    def now_added(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated() - self.baseline
        return self._status_bytes("VmRSS") - self.baseline


@torch.no_grad()
def measure(cache_name: str, context: int, *, chunk: int = 512, tokens: int = 16, device: str = "cpu",
            dtype: str = "float32", random_weights: bool = False, shape: str = "smollm2",
            predictors: str | None = None, seed: int = 0) -> dict:
    """One row: load the model, baseline, prefill `context` tokens in pieces of `chunk`, decode `tokens` greedily.
    Meant for a fresh process (what ran before in the process shifts the CPU baseline); returns the JSON row."""
    from aquakv.evaluation.accounting import cache_nbytes
    from aquakv.hf_compat import cache_kwargs

    if cache_name not in CACHES:
        raise SystemExit(f"--cache: unknown cache {cache_name!r}; choose from {', '.join(CACHES)}")
    model, text = load_model_and_text(random_weights, shape, device, dtype, seed, context)
    prompt = text[:context][None].to(device)
    model(input_ids=prompt[:, :16], use_cache=False, logits_to_keep=1)  # first-call allocations stay out
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    memory = PeakMemory(device)
    memory.start()

    cache = build_cache(cache_name, model, predictors, seed)
    kw = cache_kwargs(model, cache)
    t0 = time.perf_counter()
    for start in range(0, context, chunk):
        logits = model(input_ids=prompt[:, start:start + chunk], use_cache=True, logits_to_keep=1, **kw).logits
    nxt = logits[:, -1:].argmax(-1)
    sync()
    prefill_s = time.perf_counter() - t0
    peak_after_prefill = memory.peak_added()
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
    sync()
    ms_per_token = (time.perf_counter() - t0) * 1e3 / max(tokens, 1)
    row = dict(cache=cache_name, label=CACHES[cache_name], context=context, chunk=chunk, tokens=tokens,
               device=device, dtype=dtype, threads=torch.get_num_threads(), baseline_bytes=memory.baseline,
               peak_added_bytes=memory.peak_added(), peak_added_after_prefill_bytes=peak_after_prefill,
               end_added_bytes=memory.now_added(), nbytes=cache_nbytes(cache), prefill_s=prefill_s,
               ms_per_token=ms_per_token, peak_note=memory.note)
    getattr(cache, "close", lambda: None)()
    return row


# ---- the parent -------------------------------------------------------------------------------------------------
def child_argv(args, cache: str, context: int, predictors: str | None) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--cache", cache, "--contexts", str(context),
            "--chunk", str(args.chunk), "--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype,
            "--shape", args.shape, "--seed", str(args.seed)]
    if args.random_weights:
        argv.append("--random-weights")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if predictors and cache.startswith("aqua-kv-2"):
        argv += ["--predictors", predictors]
    return argv


def child_env(mmap_threshold: int) -> dict:
    """The child's environment. On glibc, a fixed mmap threshold makes every block of at least that many bytes
    its own mapping, returned to the system when freed: RSS then follows the live tensors. With glibc's default
    (a threshold that grows to the largest block freed so far) mid-size transients come from the heap, which
    cannot shrink below the cache's long-lived chunks allocated after them, and the peak measures fragmentation
    as much as the cache. 0 keeps glibc's default."""
    env = dict(os.environ)
    if mmap_threshold > 0:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(mmap_threshold))
    return env


def run_child(argv: list[str], timeout: float | None = None, tail_lines: int = 25, env: dict | None = None) -> dict:
    """Run one child; its JSON row, or {"error": ..., "stderr_tail": ...} when it fails (nothing is swallowed)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        err = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
        return {"error": f"timed out after {timeout:g} s", "stderr_tail": "\n".join(err.splitlines()[-tail_lines:])}
    tail = "\n".join(proc.stderr.splitlines()[-tail_lines:])
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"child exited with status {proc.returncode}", "stderr_tail": tail}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "child printed no JSON row", "stderr_tail": tail + "\nstdout: " + lines[-1][-500:]}


def fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def table(context: int, rows: list[dict]) -> str:
    """One Markdown table for one context (rows in the order measured)."""
    fp16 = next((r for r in rows if r["cache"] == "fp16" and "error" not in r), None)
    out = [f"context {context} tokens:\n",
           "| cache | peak added MiB | vs fp16 | held (nbytes) MiB | transient MiB | prefill s | ms / token |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {CACHES.get(r['cache'], r['cache'])} | FAILED: {r['error']} | | | | | |")
            continue
        ratio = f"{r['peak_added_bytes'] / fp16['peak_added_bytes']:.2f}" if fp16 and fp16["peak_added_bytes"] else "-"
        transient = None if r["nbytes"] is None else r["peak_added_bytes"] - r["nbytes"]
        out.append(f"| {r['label']} | {fmt_mib(r['peak_added_bytes'])} | {ratio} | {fmt_mib(r['nbytes'])} | "
                   f"{fmt_mib(transient)} | {r['prefill_s']:.1f} | {r['ms_per_token']:.1f} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="prompt lengths")
    p.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES))
    p.add_argument("--predictors", help="AQUA-KV-2 predictors (`aquakv calibrate --bits 2 --out FILE`); default: a "
                                        "quick calibration in the parent, saved to a temporary file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model dtype (default float32)")
    p.add_argument("--chunk", type=int, default=512, help="prefill piece in tokens (default 512)")
    p.add_argument("--tokens", type=int, default=16, help="greedy decode steps after the prefill (default 16)")
    p.add_argument("--random-weights", action="store_true", help="random weights and tokens, no model file")
    p.add_argument("--shape", default="smollm2", choices=list(SHAPES), help="shape of --random-weights")
    p.add_argument("--threads", type=int, help="torch CPU threads in every process (default: torch's choice)")
    p.add_argument("--json", help="also write every row to this JSON file (atomically)")
    p.add_argument("--timeout", type=float, help="seconds per child before it counts as failed (default: none)")
    p.add_argument("--mmap-threshold", type=int, default=65536, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ of every child (default 65536: freed blocks leave RSS at once, "
                        "so the peak counts live memory; 0 keeps glibc's growing threshold and its heap retention)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("chunk", "tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(c < 1 for c in args.contexts):
        p.error(f"--contexts must be >= 1, got {args.contexts}")
    if args.random_weights is False and args.shape != "smollm2":
        p.error("--shape needs --random-weights (the bundled model has SmolLM2's shape)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        row = measure(args.cache, args.contexts[0], chunk=args.chunk, tokens=args.tokens, device=args.device,
                      dtype=args.dtype, random_weights=args.random_weights, shape=args.shape,
                      predictors=args.predictors, seed=args.seed)
        print(json.dumps(row), flush=True)
        return 0

    from aquakv.atomic_writes import write_json_atomic

    print_header(args.device)
    which = f"{args.shape} shape, random weights" if args.random_weights else "bundled SmolLM2-135M"
    print(f"model: {which}, {args.dtype}; batch 1; prefill in pieces of {args.chunk} tokens, then {args.tokens} "
          f"greedy decode steps; every cache in a fresh process\n")
    with tempfile.TemporaryDirectory(prefix="aquakv-membench-") as tmp:
        predictors, source = args.predictors, f"--predictors {args.predictors}"
        needs_predictors = any(c.startswith("aqua-kv-2") for c in args.caches)
        if needs_predictors and predictors is None:
            predictors = os.path.join(tmp, "aquakv2.safetensors")
            source = quick_predictors(args, predictors)
        if needs_predictors:
            print(f"AQUA-KV-2 predictors: {source}\n")
        rows, failed = [], []
        for context in args.contexts:
            per_context = []
            for cache in args.caches:
                row = run_child(child_argv(args, cache, context, predictors), args.timeout,
                                env=child_env(args.mmap_threshold))
                row.setdefault("cache", cache)
                row.setdefault("context", context)
                per_context.append(row)
                if "error" in row:
                    failed.append(row)
                    print(f"{CACHES[cache]} at {context} tokens failed: {row['error']}\n{row['stderr_tail']}\n",
                          file=sys.stderr, flush=True)
            rows += per_context
            print(table(context, per_context) + "\n", flush=True)
    notes = sorted({r["peak_note"] for r in rows if "peak_note" in r})
    print("peak added: " + "; ".join(notes) if notes else "no row was measured")
    if args.json:
        import datetime
        import shlex

        write_json_atomic(args.json, {
            "command": f"python {shlex.join(sys.argv)}", "device": args.device,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": which, "predictors": source if needs_predictors else None, "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
