"""What the vLLM plugin pays per layer and step for every token a batch reads: one layer's decode (codes to K/V,
predictors included) over T tokens, per predictor structure, beside HIGGS alone (docs/vllm.md, "What a step costs").

    python bench/bench_vllm_decode.py --predictors full=p2.safetensors r64=p2_r64.safetensors ph=p2_ph.safetensors

Thread CPU time on one thread, median of --reps: it reads the same on a loaded machine. Needs no vLLM: the plugin's
read is this decode (the fused aqua_reconstruct) plus a copy into vLLM's page layout.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from aquakv.kv.aqua_codec import AquaKVCodec
from aquakv.kv.higgs_store import to_heads
from aquakv.kv.predictors import AquaKVPredictors


def decode_seconds(preds: AquaKVPredictors, tokens: int, layer: int, reps: int, seed: int = 0) -> float:
    """Median thread CPU seconds of one decode of `tokens` tokens of `layer` (random states; the cost does not
    depend on their values)."""
    codec = AquaKVCodec(preds)
    gen = torch.Generator().manual_seed(seed)
    k, v, ck, cv = (to_heads(torch.randn(1, tokens, preds.kv_width, generator=gen), preds.num_kv_heads)
                    for _ in range(4))
    chain = (ck, cv) if codec.needs_previous_layer else None
    store = codec.encode(layer, k, v, chain)[0]
    out, chain_out = (torch.empty_like(k), torch.empty_like(v)), (torch.empty_like(k), torch.empty_like(v))
    times = []
    for _ in range(reps):
        start = time.thread_time()
        codec.decode(layer, store, chain, out=out, chain_out=chain_out)
        times.append(time.thread_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictors", nargs="+", required=True, metavar="NAME=FILE",
                        help="predictors files to compare, each named (the first also gives HIGGS alone's settings)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens decoded (batch 8 x 2k context: 16384)")
    parser.add_argument("--layer", type=int, default=5, help="a chained layer (not layer 0)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    named = []
    for item in args.predictors:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--predictors takes NAME=FILE, got {item!r}")
        named.append((name, AquaKVPredictors.load(path)))
    torch.set_num_threads(1)
    first = named[0][1]
    higgs = AquaKVPredictors([None] * first.num_layers, [None] * first.num_layers, first.settings, first.model_info)
    rows = [("HIGGS alone", higgs), *named]
    print(f"one layer's decode of {args.tokens} tokens (layer {args.layer}, one thread, median of {args.reps})")
    print("| predictors | ms per layer | ns per token | x HIGGS alone |\n|---|---:|---:|---:|")
    base = None
    for name, preds in rows:
        seconds = decode_seconds(preds, args.tokens, args.layer, args.reps)
        base = base or seconds
        print(f"| {name} | {1e3 * seconds:.1f} | {1e9 * seconds / args.tokens:.0f} | {seconds / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
