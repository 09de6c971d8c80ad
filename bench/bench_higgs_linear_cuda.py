"""higgs_linear's fused CUDA kernel against F.linear (fp16, bf16 weights) and dequantize-then-matmul, on a GPU.

One run, one process: layers 4096x4096 and 14336x4096 / 4096x14336 (out x in), batch 1 / 16 / 512, grid (2,256)
(4 bits) and (2,16) (2 bits) at group size 256, x in float16. Times are CUDA-event medians
(torch.utils.benchmark); ratios are within one row. "codes GB/s" is the packed codes + scales read once per
call over the op's time (the kernel's floor at batch <= 8; larger batches re-read them once per 8 rows).

    python bench/bench_higgs_linear_cuda.py            # what bench/GPU_RUNBOOK.md runs
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

import aquakv.ops as ops
from aquakv.grids import get_grid
from aquakv.quantizer import random_signs

SHAPES = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096), "4096x14336": (4096, 14336)}
BATCHES = (1, 16, 512)
GRIDS = ((2, 256), (2, 16))
GROUP = 256


def median_us(fn, min_time: float) -> float:
    return tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per method and row")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; fused kernel: {not ops.CUDA_STAND_IN}")
    print("| shape (out x in) | batch | grid | op us | fp16 us | bf16 us | deq+mm us | op / fp16 | op / bf16 | "
          "op / deq+mm | codes GB/s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, (out, inp) in SHAPES.items():
        weight = torch.randn(out, inp, generator=gen, device="cuda") * 0.02
        w16, wb16 = weight.half(), weight.bfloat16()
        for d, n in GRIDS:
            grid, signs = get_grid(d, n).cuda(), random_signs(GROUP, 0).cuda()
            codes, scales = ops.higgs_quantize(weight, grid, signs, GROUP)
            nbytes = codes.numel() + 2 * scales.numel()
            for batch in BATCHES:
                x = torch.randn(batch, inp, generator=gen, device="cuda").half()
                xb = x.bfloat16()
                t = {
                    "op": median_us(lambda: ops.higgs_linear(x, codes, scales, grid, signs, GROUP), args.min_time),
                    "fp16": median_us(lambda: F.linear(x, w16), args.min_time),
                    "bf16": median_us(lambda: F.linear(xb, wb16), args.min_time),
                    "deq": median_us(lambda: F.linear(x, ops.higgs_dequantize(codes, scales, grid, signs, GROUP,
                                                                              torch.float16)), args.min_time),
                }
                print(f"| {label} | {batch} | ({d},{n}) | {t['op']:.1f} | {t['fp16']:.1f} | {t['bf16']:.1f} | "
                      f"{t['deq']:.1f} | {t['op'] / t['fp16']:.2f} | {t['op'] / t['bf16']:.2f} | "
                      f"{t['op'] / t['deq']:.2f} | {nbytes / t['op'] / 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
