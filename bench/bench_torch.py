"""Our fused ops vs the torch-only pipeline (bench/torch_pipeline.py) on whatever device is there.

    python bench/bench_torch.py                 # cuda if available, else cpu
    python bench/bench_torch.py --device cpu --tokens 1024 4096

HIGGS: T tokens x C = 1024 fp16 values, grid (d=2, n=16) = 2 bits/value, groups of 128 and 64;
hadamard: our op vs a dense matmul by the Hadamard matrix. Prints median times, speedups, GB/s
(bytes each op must read + write) and how many codes the two pipelines agree on.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aquakv.ops as ops  # noqa: E402
import torch_pipeline as tp  # noqa: E402
from aquakv.grids import get_grid  # noqa: E402
from aquakv.quantizer import random_signs  # noqa: E402
from common import gbs, median_ms, print_header  # noqa: E402


def bench_higgs(device: str, tokens: int, group: int, min_time: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, 1024, device=device).half()
    grid = get_grid(2, 16).to(device)
    signs = random_signs(group, seed=0).to(device)
    ours = ops.higgs_quantize(x, grid, signs, group)
    theirs = tp.quantize(x, grid, signs, group)
    agree = float((ops.unpack_bits(ours[0], 4, 512) == ops.unpack_bits(theirs[0], 4, 512)).float().mean())
    nbytes = x.numel() * 2 + ours[0].numel() + ours[1].numel() * 2
    q_ours = median_ms(lambda: ops.higgs_quantize(x, grid, signs, group), min_time)
    q_torch = median_ms(lambda: tp.quantize(x, grid, signs, group), min_time)
    d_ours = median_ms(lambda: ops.higgs_dequantize(*ours, grid, signs, group, torch.float16), min_time)
    d_torch = median_ms(lambda: tp.dequantize(*ours, grid, signs, group, torch.float16), min_time)
    shape = f"{tokens} x 1024 fp16, G={group}"
    print(f"| quantize   | {shape:28} | {q_ours:9.3f} | {q_torch:9.3f} | {q_torch / q_ours:7.1f}x | "
          f"{gbs(nbytes, q_ours):7.2f} | codes agree {100 * agree:.3f}%")
    print(f"| dequantize | {shape:28} | {d_ours:9.3f} | {d_torch:9.3f} | {d_torch / d_ours:7.1f}x | "
          f"{gbs(nbytes, d_ours):7.2f} |")


def bench_hadamard(device: str, n: int, total_bytes: int, min_time: float) -> None:
    dtype = torch.float16 if device == "cuda" else torch.float32  # CPU fp16 matmul is not a fair baseline
    rows = total_bytes // (n * dtype.itemsize)
    x = torch.randn(rows, n, device=device).to(dtype)
    ours = median_ms(lambda: ops.hadamard(x, None, n**-0.5), min_time)
    shape = f"{rows} x {n} {str(dtype)[6:]}"
    if n <= 4096:
        dense = median_ms(lambda: tp.hadamard(x, n**-0.5), min_time)
        vs = f"{dense:9.3f} | {dense / ours:7.1f}x"
    else:  # the dense matrix alone would be n^2 values (4 GiB fp32 at 32768)
        vs = f"{'-':>9} | {'-':>8}"
    print(f"| hadamard   | {shape:28} | {ours:9.3f} | {vs} | {gbs(2 * x.numel() * dtype.itemsize, ours):7.2f} | "
          "torch = dense matmul")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts T (default: cuda 4k 32k 128k, cpu 1k 4k)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per measurement")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    tokens = args.tokens or ([4096, 32768, 131072] if cuda else [1024, 4096])
    print_header(args.device)
    print("| op         | shape                        |  ours ms  | torch ms  | speedup |  GB/s   | note")
    print("|------------|------------------------------|-----------|-----------|---------|---------|-----")
    for t in tokens:
        for group in (128, 64):
            bench_higgs(args.device, t, group, args.min_time)
    for n in (64, 128, 256, 1024, 4096, 32768):
        bench_hadamard(args.device, n, (256 if cuda else 16) << 20, args.min_time)


if __name__ == "__main__":
    main()
