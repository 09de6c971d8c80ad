"""aquakv in vLLM against vLLM's own cache, side by side: capacity, perplexity, passkey and speed (docs/vllm.md).

    python bench/bench_vllm.py --predictors p2.safetensors --out runs/vllm                 # every phase
    python bench/bench_vllm.py --predictors p2.safetensors --phases capacity quality --out runs/vllm

Phases (each engine is started in a subprocess, as a user would; vLLM spawns its workers):
  capacity  tokens the KV cache holds at VLLM_CPU_KVCACHE_SPACE=1 GiB, read from vLLM's own log line, model in
            float32 and in bfloat16;
  quality   perplexity from prompt_logprobs over the held-out windows of 1024 (the README's protocol), chunked
            prefill of 128, one window at a time; beside it the transformers cache (sinks=1, buffer=1) fed the same
            128-token chunks, the protocol the vLLM number must match (float32);
  passkey   greedy retrieval of a 5-digit key at 1k-4k tokens (aquakv.longctx's task), through vLLM;
  speed     decode time per output token and tokens/s at batch 1, 8, 32 (context --context), and the largest batch
            whose requests fit a fixed KV budget (--budget-mib) at that context, with its throughput.
Writes results.json and results.md into --out; needs vllm-cpu (docs/vllm.md has the install).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CACHES = ("vllm", "higgs2", "aquakv2")


def aquakv_config(cache: str, predictors: str | None) -> dict | None:
    return {"vllm": None, "higgs2": {"method": "higgs", "bits": 2}, "aquakv2": {"predictors": predictors}}[cache]


# ---- the worker: one engine, one job ------------------------------------------------------------------------
def worker(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    extra: dict = {} if job["aquakv"] is None else {"additional_config": {"aquakv": job["aquakv"]}}
    if job.get("blocks"):
        extra["num_gpu_blocks_override"] = job["blocks"]
    if job.get("max_num_seqs"):
        extra["max_num_seqs"] = job["max_num_seqs"]
    llm = LLM(model=job["model"], enforce_eager=True, max_model_len=job.get("max_model_len", 2048),
              max_num_batched_tokens=job.get("batched_tokens", 128), enable_chunked_prefill=True,
              enable_prefix_caching=job.get("prefix_caching", True), dtype=job["dtype"], seed=0, **extra)
    out: dict = {}
    if job["kind"] == "quality":
        nll, count = 0.0, 0
        for ids in job["windows"]:  # one at a time: every window is chunked at 128, 256, ... as the protocol is
            result = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
            logprobs = [next(iter(d.values())).logprob for d in result.prompt_logprobs[1:]]
            nll, count = nll - sum(logprobs), count + len(logprobs)
        out = {"nll": nll / count, "tokens": count}
    elif job["kind"] == "passkey":
        prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
        results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
        out = {"answers": [r.outputs[0].text for r in results]}
    elif job["kind"] == "speed":  # "start" jobs only start the engine (capacity: vLLM logs it)
        out = {"runs": [_speed(llm, job["context"], batch, job["new_tokens"]) for batch in job["batches"]]}
    return out


def _speed(llm, context: int, batch: int, new_tokens: int) -> dict:
    """`batch` fresh requests of `context` tokens stepped through the engine: prefill until every request has its
    first token, then decode timed alone until each has 1 + new_tokens."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1 + new_tokens, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        ids = [(i * 104729 + t * 7919) % 20000 + 100 for t in range(context)]
        engine.add_request(f"speed-{batch}-{i}", {"prompt_token_ids": ids}, params)
    produced: dict[str, int] = {}
    start = time.perf_counter()
    decode_start = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            produced[output.request_id] = len(output.outputs[0].token_ids)
        if decode_start is None and len(produced) == batch and min(produced.values()) >= 1:
            decode_start = time.perf_counter()
            decoded_before = sum(produced.values())
    end = time.perf_counter()
    decode = end - decode_start
    tokens = sum(produced.values()) - decoded_before
    return {"batch": batch, "context": context, "prefill_s": decode_start - start, "decode_s": decode,
            "ms_per_output_token": 1000 * decode * batch / tokens, "tokens_per_s": tokens / decode}


# ---- the driver -------------------------------------------------------------------------------------------------
def run_job(job: dict, log_dir: Path, name: str, budget_gib: int = 1) -> tuple[dict, int | None]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(budget_gib), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    job_file = log_dir / f"{name}.job.json"  # a file, not argv: passkey prompts of 4k tokens overflow a command line
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(job_file)], env=env, capture_output=True,
                          text=True)
    log = proc.stdout + proc.stderr
    (log_dir / f"{name}.log").write_text(log)
    if proc.returncode != 0 or "RESULT " not in log:
        raise RuntimeError(f"{name} failed (log: {log_dir / (name + '.log')}):\n{log[-3000:]}")
    tokens = re.findall(r"CPU KV cache size: ([\d,]+) tokens", log)
    return json.loads(log.split("RESULT ", 1)[1].splitlines()[0]), int(tokens[-1].replace(",", "")) if tokens else None


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a job file (JSON)
    parser.add_argument("--predictors", help="AQUA-KV predictors file (aquakv calibrate --bits 2)")
    parser.add_argument("--out", default="runs/vllm", help="directory for results.json, results.md and logs")
    parser.add_argument("--phases", nargs="+", default=["capacity", "quality", "passkey", "speed"],
                        choices=["capacity", "quality", "passkey", "speed"])
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 1024 (quality)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="passkey lengths")
    parser.add_argument("--samples", type=int, default=2, help="passkey samples per length and depth")
    parser.add_argument("--context", type=int, default=2048, help="speed: tokens of context per request")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="speed: batch sizes")
    parser.add_argument("--new-tokens", type=int, default=16, help="speed: decoded tokens per request")
    parser.add_argument("--budget-mib", type=int, default=64, help="speed: the fixed KV budget of the largest batch")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(Path(args.worker).read_text()))), flush=True)
        return
    if "aquakv2" in args.caches and not args.predictors:
        parser.error("--predictors is required for the aquakv2 cache (or leave it out of --caches)")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    from aquakv.models import hf_directory

    model = str(hf_directory())
    predictors = str(Path(args.predictors).resolve()) if args.predictors else None
    results: dict = {"model": model, "predictors": predictors, "date": time.strftime("%Y-%m-%d"),
                     "cpu": _cpu_name()}

    def job(cache, kind, dtype="float32", **kw):
        return {"model": model, "aquakv": aquakv_config(cache, predictors), "kind": kind, "dtype": dtype, **kw}

    def save():  # after every phase: a long run that is stopped keeps what it measured
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "results.md").write_text(report(results))

    if "capacity" in args.phases:
        results["capacity"] = {}
        for dtype in ("float32", "bfloat16"):
            for cache in args.caches:
                say(f"capacity: {cache} {dtype}")
                _, tokens = run_job(job(cache, "start", dtype), out / "logs", f"capacity_{cache}_{dtype}")
                results["capacity"][f"{cache}/{dtype}"] = tokens
        save()
    if "quality" in args.phases:
        results["quality"] = quality(args, job, out, predictors)
        save()
    if "speed" in args.phases:
        results["speed"] = speed(args, job, out, model, predictors)
        save()
    if "passkey" in args.phases:
        results["passkey"] = passkey(args, job, out)
        save()
    print(report(results))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def quality(args, job, out: Path, predictors) -> dict:
    import torch
    from aquakv.data import default_texts, tokenize
    from aquakv.evaluation.nll import window_nll
    from aquakv.evaluation.windows import cut_windows
    from aquakv.kv.cache_presets import AquaKVCache, HiggsCache
    from aquakv.kv.predictors import AquaKVPredictors
    from aquakv.models import load_model

    model, tok = load_model()
    ids = tokenize(tok, default_texts("evaluation"))
    windows = [w.tolist() for w in cut_windows(ids, 1024, keep_tail=False, max_windows=args.windows)]
    found = {}
    for cache in args.caches:
        say(f"quality: {cache} through vLLM, {len(windows)} windows")
        result, _ = run_job(job(cache, "quality", windows=windows), out / "logs", f"quality_{cache}")
        found[cache] = {"vllm_nll": result["nll"], "tokens": result["tokens"]}
        make = {"vllm": lambda: None, "higgs2": lambda: HiggsCache(model, 2, sinks=1, buffer=1),
                "aquakv2": lambda: AquaKVCache(model, AquaKVPredictors.load(predictors), sinks=1, buffer=1)}[cache]
        if cache == "vllm":
            from transformers import DynamicCache
            make = lambda: DynamicCache(config=model.config)  # noqa: E731
        say(f"quality: {cache} through the transformers cache, same chunks")
        with torch.no_grad():
            total = sum(float(window_nll(model, torch.tensor(w)[None], make(), step=128)) for w in windows)
        found[cache]["transformers_nll"] = total / found[cache]["tokens"]
    return found


def passkey(args, job, out: Path) -> dict:
    from aquakv.longctx.haystack import REPEATED_FILLER, Haystack
    from aquakv.longctx.passkey import answer_matches, build_tasks
    from aquakv.models import load_model

    _, tok = load_model()  # the task of `aquakv longctx --task needle` (its default haystack: repeated sentences)
    tasks = build_tasks(tok, args.lengths, samples=args.samples, haystack=Haystack(tok, [REPEATED_FILLER]))
    found = {}
    for cache in args.caches:
        say(f"passkey: {cache}, {len(tasks)} prompts")
        result, _ = run_job(job(cache, "passkey", prompts=[t.input_ids.tolist() for t in tasks],
                                max_model_len=max(args.lengths) + 64, batched_tokens=1024),
                            out / "logs", f"passkey_{cache}")
        found[cache] = {str(length): sum(answer_matches(a, t.key) for a, t in zip(result["answers"], tasks)
                                         if t.length == length) / sum(t.length == length for t in tasks)
                        for length in args.lengths}
    return found


def speed(args, job, out: Path, model: str, predictors) -> dict:
    """Batches at equal settings, then the largest batch whose pages fit --budget-mib at --context."""
    found = {}
    per_request = args.context + args.new_tokens + 1
    for cache in args.caches:
        say(f"speed: {cache}, batches {args.batches} at {args.context} tokens")
        result, _ = run_job(job(cache, "speed", prefix_caching=False, context=args.context, batches=args.batches,
                                new_tokens=args.new_tokens, batched_tokens=2048, max_model_len=per_request + 128),
                            out / "logs", f"speed_{cache}")
        found[cache] = {"runs": result["runs"]}
        blocks = args.budget_mib * 2 ** 20 // (128 * page_bytes_per_token(cache, model, predictors))
        batch = int(blocks // math.ceil(per_request / 128))
        if batch < 1:
            found[cache]["largest"] = {"batch": 0, "blocks": int(blocks)}
            continue
        say(f"speed: {cache}, the largest batch in {args.budget_mib} MiB: {batch}")
        result, _ = run_job(job(cache, "speed", prefix_caching=False, context=args.context, batches=[batch],
                                new_tokens=args.new_tokens, batched_tokens=2048, blocks=int(blocks),
                                max_model_len=per_request + 128), out / "logs", f"largest_{cache}")
        found[cache]["largest"] = {**result["runs"][0], "blocks": int(blocks), "budget_mib": args.budget_mib}
    return found


def page_bytes_per_token(cache: str, model: str, predictors) -> int:
    """Bytes one token takes in every layer's pages: vLLM's float32 K and V, or the codec's rows."""
    from aquakv.vllm.config import EngineFacts, ServingConfig, build_codec
    from aquakv.vllm.pages import layer_layouts
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    if cache == "vllm":
        return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    facts = EngineFacts(hf_config=config, model=model, kv_cache_dtype="auto", tensor_parallel_size=1)
    codec = build_codec(ServingConfig.parse(aquakv_config(cache, predictors)), facts)
    return sum(layout.row_bytes for layout in layer_layouts(codec))


def report(results: dict) -> str:
    lines = [f"# aquakv in vLLM ({results['date']}, {results['cpu']}, vllm-cpu 0.32.0)", ""]
    cap = results.get("capacity")
    if cap:
        lines += ["| cache | tokens at 1 GiB, float32 model | x vLLM | tokens at 1 GiB, bfloat16 model | x vLLM |",
                  "|---|---:|---:|---:|---:|"]
        for cache in CACHES:
            if f"{cache}/float32" in cap:
                f32, b16 = cap[f"{cache}/float32"], cap[f"{cache}/bfloat16"]
                lines.append(f"| {cache} | {f32:,} | {f32 / cap['vllm/float32']:.2f} | {b16:,} | "
                             f"{b16 / cap['vllm/bfloat16']:.2f} |")
        lines.append("")
    q = results.get("quality")
    if q:
        base = math.exp(q["vllm"]["vllm_nll"]) if "vllm" in q else None
        lines += ["| cache | ppl through vLLM | vs vLLM's own cache | ppl, transformers cache, same chunks | "
                  "vLLM vs transformers |", "|---|---:|---:|---:|---:|"]
        for cache, r in q.items():
            v, t = math.exp(r["vllm_nll"]), math.exp(r["transformers_nll"])
            rel = f"{100 * (v / base - 1):+.2f}%" if base else "-"
            lines.append(f"| {cache} | {v:.4f} | {rel} | {t:.4f} | {100 * (v / t - 1):+.2f}% |")
        lines.append("")
    p = results.get("passkey")
    if p:
        lengths = list(next(iter(p.values())))
        lines += ["| cache | " + " | ".join(f"passkey {n}" for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        lines += [f"| {cache} | " + " | ".join(f"{100 * r[n]:.0f}%" for n in lengths) + " |" for cache, r in p.items()]
        lines.append("")
    s = results.get("speed")
    if s:
        lines += ["| cache | batch | context | ms per output token | tokens/s | vs vLLM's own cache |",
                  "|---|---:|---:|---:|---:|---:|"]
        base = {r["batch"]: r["ms_per_output_token"] for r in s.get("vllm", {}).get("runs", [])}
        for cache, r in s.items():
            for run in r["runs"]:
                ratio = f"{run['ms_per_output_token'] / base[run['batch']]:.2f}x" if run["batch"] in base else "-"
                lines.append(f"| {cache} | {run['batch']} | {run['context']} | {run['ms_per_output_token']:.1f} | "
                             f"{run['tokens_per_s']:.1f} | {ratio} |")
        lines += ["", "| cache | KV budget | largest batch at the context | ms per output token | tokens/s |",
                  "|---|---:|---:|---:|---:|"]
        for cache, r in s.items():
            big = r.get("largest", {})
            if big.get("batch"):
                lines.append(f"| {cache} | {big['budget_mib']} MiB | {big['batch']} | "
                             f"{big['ms_per_output_token']:.1f} | {big['tokens_per_s']:.1f} |")
            else:
                lines.append(f"| {cache} | - | 0 (one request does not fit) | - | - |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
