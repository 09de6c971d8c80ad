"""CPU kernels vs the NumPy reference (python/aquakv/reference), side by side.

    python bench/bench_cpu.py              # uses torch's default thread count
    python bench/bench_cpu.py --threads 1

The reference is float64 NumPy written for clarity; this shows what the C++ kernels buy on the CPU
and their absolute throughput (GB/s of bytes read + written).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aquakv.ops as ops  # noqa: E402
from aquakv import reference as ref  # noqa: E402
from aquakv.grids import get_grid  # noqa: E402
from common import gbs, median_ms, print_header  # noqa: E402


def row(op: str, shape: str, ours: float, numpy_ms: float, nbytes: float) -> None:
    print(f"| {op:10} | {shape:31} | {ours:9.3f} | {numpy_ms:10.2f} | {numpy_ms / ours:7.1f}x | {gbs(nbytes, ours):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-time", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_header("cpu")
    print("| op         | shape                           |  ours ms  |  numpy ms  | speedup | GB/s")
    print("|------------|---------------------------------|-----------|------------|---------|------")
    t = args.min_time
    for n in (64, 1024, 32768):
        x = torch.randn(1 << 22 >> int(np.log2(n)), n)  # 4M fp32 values
        xn = x.numpy()
        ours = median_ms(lambda: ops.hadamard(x, None, n**-0.5), t)
        theirs = median_ms(lambda: ref.hadamard(xn, None, n**-0.5), t)
        row("hadamard", f"{x.shape[0]} x {n} fp32", ours, theirs, 2 * x.numel() * 4)

    for d, n_points in ((2, 16), (2, 256)):
        x = torch.randn(1024, 1024)
        grid, signs = get_grid(d, n_points), torch.from_numpy(ref.random_signs(128, 0))
        codes, scales = ops.higgs_quantize(x, grid, signs, 128)
        nbytes = x.numel() * 4 + codes.numel() + scales.numel() * 2
        args_np = (x.numpy(), grid.numpy(), signs.numpy(), 128)
        shape = f"1024 x 1024 fp32, G=128 ({d},{n_points})"
        row("quantize", shape, median_ms(lambda: ops.higgs_quantize(x, grid, signs, 128), t),
            median_ms(lambda: ref.higgs_quantize(*args_np), t), nbytes)
        cn, sn = codes.numpy(), scales.numpy()
        row("dequantize", shape, median_ms(lambda: ops.higgs_dequantize(codes, scales, grid, signs, 128, torch.float32), t),
            median_ms(lambda: ref.higgs_dequantize(cn, sn, grid.numpy(), signs.numpy(), 128), t), nbytes)

    codes = torch.randint(0, 16, (4096, 1024), dtype=torch.int32)
    packed = ops.pack_bits(codes, 4)
    cn, pn = codes.numpy(), packed.numpy()
    row("pack 4b", "4096 x 1024 int32", median_ms(lambda: ops.pack_bits(codes, 4), t),
        median_ms(lambda: ref.pack_bits(cn, 4), t), codes.numel() * 4 + packed.numel())
    row("unpack 4b", "4096 x 1024 int32", median_ms(lambda: ops.unpack_bits(packed, 4, 1024), t),
        median_ms(lambda: ref.unpack_bits(pn, 4, 1024), t), codes.numel() * 4 + packed.numel())


if __name__ == "__main__":
    main()
