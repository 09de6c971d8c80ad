"""torch.ops.aquakv.higgs_linear against F.linear (float32 and bfloat16 weights) and dequantize-then-matmul.

One run, same process, same shapes: SmolLM2-135M's projections and 4096x4096, 14336x4096, 4096x14336 (out x in),
batch 1 / 4 / 16 / 512, grids (2,16), (2,64), (2,256) at group size 256 (row-aligned: SmolLM2's in = 576 uses
64). The machine's read bandwidth is measured first (a float32 sum over 512 MiB); the op's floor is reading
its codes and scales once at that bandwidth, and "% BW" is floor / time.

Timing: the methods of one row run interleaved, round after round, and each reports its fastest round (the
least-disturbed one on a shared machine). Ratios are within one row. With --threads 1 the clock is the thread's
CPU time (time.thread_time): on a machine shared with other jobs, wall time there mostly measures the neighbours.

    python bench/bench_higgs_linear.py                      # everything (several minutes on 2 cores)
    python bench/bench_higgs_linear.py --quick              # 4096x4096 and SmolLM2's q_proj only
    python bench/bench_higgs_linear.py --threads 1          # what bench/RESULTS.md reports (shared 2-core CPU)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import print_header

import aquakv.ops as ops
from aquakv.grids import get_grid
from aquakv.quantizer import random_signs
from aquakv.weights.linear import row_group_size

SMOLLM2 = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
           "down_proj": (576, 1536)}
LARGE = {"4096x4096": (4096, 4096), "14336x4096": (14336, 4096), "4096x14336": (4096, 14336)}
BATCHES = (1, 4, 16, 512)
GRIDS = ((2, 16), (2, 64), (2, 256))


def read_bandwidth_gbs(mib: int = 512, rounds: int = 5) -> float:
    """GB/s of one pass reading a float32 tensor that does not fit any cache (torch's sum, all threads)."""
    x = torch.ones(mib * 2**20 // 4)
    best = min(_timed(lambda: x.sum()) for _ in range(rounds))
    return x.numel() * 4 / best / 1e9


CLOCK = time.perf_counter  # time.thread_time with --threads 1


def _timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def fastest_ms(fns: dict, rounds: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _timed(fn))
    return {name: t * 1e3 for name, t in best.items()}


def bench_shape(label: str, out: int, inp: int, batches, grids, bw: float) -> list[dict]:
    gen = torch.Generator().manual_seed(out * 7 + inp)
    weight = torch.randn(out, inp, generator=gen) * 0.02
    w_bf16 = weight.bfloat16()
    layers = {}
    for d, n in grids:
        group, _ = row_group_size(inp, 256, d, n)
        grid, signs = get_grid(d, n), random_signs(group, 0)
        codes, scales = ops.higgs_quantize(weight, grid, signs, group)
        layers[(d, n)] = (codes, scales, grid, signs, group)
    rows = []
    for batch in batches:
        x = torch.randn(batch, inp, generator=gen)
        x_bf16 = x.bfloat16()
        rounds = 3 if batch * out * inp > 2**32 else 7 if batch * out * inp > 2**28 else 20
        fns = {"f32": lambda: F.linear(x, weight), "bf16": lambda: F.linear(x_bf16, w_bf16)}
        for key, (codes, scales, grid, signs, group) in layers.items():
            fns[f"op{key}"] = lambda c=codes, s=scales, g=grid, sg=signs, G=group: ops.higgs_linear(x, c, s, g, sg, G)
            fns[f"deq{key}"] = lambda c=codes, s=scales, g=grid, sg=signs, G=group: F.linear(
                x, ops.higgs_dequantize(c, s, g, sg, G))
        ms = fastest_ms(fns, rounds)
        for key, (codes, scales, *_rest, group) in layers.items():
            nbytes = codes.numel() + 2 * scales.numel()
            op = ms[f"op{key}"]
            rows.append(dict(shape=label, out=out, inp=inp, batch=batch, grid=list(key), group=group,
                             op_ms=op, f32_ms=ms["f32"], bf16_ms=ms["bf16"], deq_ms=ms[f"deq{key}"],
                             code_bytes=nbytes, op_gbs=nbytes / op / 1e6, bw_share=nbytes / bw / 1e9 / (op * 1e-3)))
            print(_row(rows[-1]), flush=True)
    return rows


HEAD = ("| shape (out x in) | batch | grid | G | op ms | op / f32 | op / bf16 | op / deq+mm | codes GB/s | % BW |\n"
        "|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    return (f"| {r['shape']} | {r['batch']} | ({r['grid'][0]},{r['grid'][1]}) | {r['group']} | {r['op_ms']:.3g} | "
            f"{r['op_ms'] / r['f32_ms']:.2f} | {r['op_ms'] / r['bf16_ms']:.2f} | {r['op_ms'] / r['deq_ms']:.2f} | "
            f"{r['op_gbs']:.2f} | {100 * r['bw_share']:.0f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 and SmolLM2's q_proj only")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's). On a shared machine 1 thread keeps "
                   "the ratios clean: a busy neighbour stalls every parallel region, and the op has three per call")
    args = p.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.threads == 1:
        CLOCK = time.thread_time
    print_header("cpu")
    bw = read_bandwidth_gbs()
    print(f"measured read bandwidth: {bw:.1f} GB/s (float32 sum over 512 MiB, {torch.get_num_threads()} threads); "
          f"clock: {CLOCK.__name__}\n")
    print(HEAD)
    shapes = {**SMOLLM2, **LARGE}
    if args.quick:
        shapes = {k: shapes[k] for k in ("q_proj/o_proj", "4096x4096")}
    rows = []
    for label, (out, inp) in shapes.items():
        rows += bench_shape(label, out, inp, BATCHES, GRIDS, bw)
    if args.out:
        args.out.write_text(json.dumps(dict(read_bandwidth_gbs=bw, rows=rows), indent=1))


if __name__ == "__main__":
    main()
