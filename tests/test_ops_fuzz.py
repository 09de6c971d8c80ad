"""A seeded fuzz sweep over torch.ops.aquakv.*: valid and invalid calls on cpu, meta and both mixed.

Each call is drawn at random (dtypes, dims, sizes, bits, group sizes, counts, devices), and its
validity is decided by the rules written out again below (VALIDITY), independently of the checks
in csrc/checks.h and aquakv.ops. Then:
  * a valid call must succeed; on cpu its result is checked against the NumPy reference
    (tests/sweeps.py rules), on meta its shapes and dtypes;
  * an invalid call must raise RuntimeError, ValueError or TypeError with a message naming the op,
    and never crash or return.
The sweep runs in a subprocess, so a segfault or an abort is a test failure that names the call
being made (the worker logs each call before making it), not a dead test session.
Budget: FUZZ_CALLS calls, a few seconds on one core.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_CALLS = 2000
SEED = 20240601
HERE = Path(__file__).resolve().parent

# ---- worker (runs in the subprocess) ------------------------------------------------------------

DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8", "int8", "bool", "complex64"]


def worker(seed: int, calls: int, log_path: str) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import aquakv.ops as ops
    from aquakv import reference as ref
    from sweeps import check_close, check_codes, check_scales, to_f64

    rng = random.Random(seed)
    dt = {name: getattr(torch, name) for name in DTYPE_NAMES}
    floats = (torch.float32, torch.float16, torch.bfloat16)

    def pick_dtype(good: torch.dtype) -> torch.dtype:
        return good if rng.random() < 0.85 else dt[rng.choice(DTYPE_NAMES)]

    def pow2_or_not(lo: int, hi: int) -> int:
        r = rng.random()
        if r < 0.8:
            return 2 ** rng.randint(lo, hi)
        return rng.choice([0, 1, 3, 6, 12, 96, -4, 2**15 * 2, 2**40, -(2**62)])

    def tensor(shape, dtype, device, noncontig=False):
        shape = tuple(shape)
        if dtype.is_floating_point or dtype.is_complex:
            t = torch.randn(shape, dtype=torch.float32).to(dtype) if device != "meta" else torch.empty(shape, dtype=dtype)
        elif dtype == torch.bool:
            t = torch.rand(shape) < 0.5
        else:
            hi = {torch.uint8: 256, torch.int8: 128}.get(dtype, 2**16)
            lo = 0 if dtype == torch.uint8 else -4
            t = torch.randint(lo, hi, shape, dtype=dtype)
        if noncontig and len(shape) >= 1 and device != "meta":
            t = torch.stack([t, t], dim=-1)[..., 0]  # same values, stride 2
        return t.to(device)

    def devices_for(n_tensors: int) -> list[str]:
        r = rng.random()
        if r < 0.6:
            return ["cpu"] * n_tensors
        if r < 0.85:
            return ["meta"] * n_tensors
        devs = ["cpu"] * n_tensors
        devs[rng.randrange(n_tensors)] = "meta"
        return devs

    def lead_dims() -> tuple[int, ...]:
        return rng.choice([(), (1,), (3,), (2, 2), (0,), (2, 0), (5,)])

    def maybe_0d(shape):
        return () if rng.random() < 0.03 else shape

    def grid_points() -> int:
        return rng.choice([2, 4, 16, 16, 256, 2, 4]) if rng.random() < 0.9 else rng.choice([1, 6, 12, 512, 65536, 0])

    # Every generator returns (op name, fn, args, validity, check of a valid result).
    def gen_hadamard():
        n = pow2_or_not(1, 9)
        devs = devices_for(2)
        dtype = pick_dtype(rng.choice(floats))
        shape = maybe_0d((*lead_dims(), max(n, 0) if n < 2**12 else 2))
        n_real = shape[-1] if shape else None
        x = tensor(shape, dtype, devs[0], noncontig=rng.random() < 0.2)
        signs = None
        if rng.random() < 0.7:
            ns = n_real if (n_real is not None and rng.random() < 0.9) else rng.choice([1, 4, 8])
            signs = tensor((ns,) if rng.random() < 0.95 else (1, ns), pick_dtype(torch.float32), devs[1])
            if signs.dtype == torch.float32 and signs.device.type == "cpu":
                signs = torch.where(signs >= 0, 1.0, -1.0)
        scale = rng.choice([1.0, 0.5, 2.0**-4])
        valid = (x.dim() >= 1 and x.dtype in floats and n_real is not None and n_real >= 2
                 and n_real & (n_real - 1) == 0 and n_real <= 32768)
        if signs is not None:
            valid = valid and signs.dtype == torch.float32 and signs.dim() == 1 and signs.shape[0] == n_real
            valid = valid and signs.device == x.device

        def check(y):
            assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
            if x.device.type == "cpu":
                s = None if signs is None else signs.numpy()
                check_close(y, ref.hadamard(to_f64(x), s, scale),
                            ref.hadamard(to_f64(x), s, scale, compute_dtype=np.float32), "hadamard")

        return "hadamard", ops.hadamard, (x, signs, scale), valid, check

    def higgs_args():
        """Shared draw for quantize / dequantize: (grid, signs, group_size, d, n, code_bits, ok)."""
        n = grid_points()
        d = rng.choice([1, 2, 4, 1, 2, 3, 8]) if rng.random() < 0.95 else 0
        group_size = pow2_or_not(1, 8)
        return n, d, group_size

    def grid_ok(n: int, d: int, grid) -> bool:
        return (grid.dtype == torch.float32 and grid.dim() == 2 and d >= 1 and n >= 2 and n & (n - 1) == 0
                and (n <= 256 or n == 65536))

    def group_ok(group_size: int, d: int, code_bits: int) -> bool:
        return (group_size >= 2 and group_size & (group_size - 1) == 0 and group_size <= 32768
                and group_size % d == 0 and (group_size // d * code_bits) % 8 == 0)

    def make_grid(n, d, device):
        g = tensor((n, d), pick_dtype(torch.float32), device)
        return g if rng.random() > 0.02 else g.reshape(-1)

    def make_signs(group_size, device):
        length = group_size if rng.random() < 0.92 else rng.choice([1, 8, 64])
        length = max(0, min(length, 32768 * 2))
        s = tensor((length,), pick_dtype(torch.float32), device)
        if s.dtype == torch.float32 and s.device.type == "cpu":
            s = torch.where(s >= 0, 1.0, -1.0)
        return s

    def gen_quantize():
        n, d, group_size = higgs_args()
        if n == 65536:
            group_size = 8  # keep the 65536-point search small
        devs = devices_for(3)
        groups = rng.choice([1, 2, 3])
        channels = groups * max(group_size, 1) if rng.random() < 0.9 else rng.choice([0, 7, 100])
        channels = min(channels, 4096)
        x = tensor(maybe_0d((*lead_dims(), channels)), pick_dtype(rng.choice(floats)), devs[0],
                   noncontig=rng.random() < 0.2)
        grid, signs = make_grid(n, d, devs[1]), make_signs(group_size, devs[2])
        code_bits = max(n, 1).bit_length() - 1
        valid = (x.dim() >= 1 and x.dtype in floats and grid_ok(n, d, grid) and group_ok(group_size, d, code_bits)
                 and signs.dtype == torch.float32 and signs.dim() == 1 and signs.shape[0] == group_size
                 and x.shape[-1] % group_size == 0 and x.device == grid.device == signs.device)

        def check(out):
            codes, scales = out
            lead, c = x.shape[:-1], x.shape[-1]
            assert codes.shape == (*lead, c // d * code_bits // 8) and codes.dtype == torch.uint8
            assert scales.shape == (*lead, c // group_size) and scales.dtype == torch.float16
            if x.device.type == "cpu" and x.numel():
                check_scales(scales, x, group_size)
                check_codes(codes, x, grid, signs, group_size)

        return "higgs_quantize", ops.higgs_quantize, (x, grid, signs, group_size), valid, check

    def gen_dequantize():
        n, d, group_size = higgs_args()
        if n == 65536:
            group_size = 8
        devs = devices_for(4)
        code_bits = max(n, 1).bit_length() - 1
        lead = lead_dims()
        groups = rng.choice([0, 1, 2, 3])
        group_bytes = group_size // d * code_bits // 8 if d >= 1 and group_size > 0 else 1
        nbytes = groups * group_bytes if rng.random() < 0.9 else groups * group_bytes + rng.choice([-1, 1])
        nbytes = max(0, min(nbytes, 1 << 14))
        codes = tensor(maybe_0d((*lead, nbytes)), pick_dtype(torch.uint8), devs[0], noncontig=rng.random() < 0.2)
        scale_lead = lead if rng.random() < 0.95 else (*lead, 1)
        scales = tensor((*scale_lead, groups), pick_dtype(torch.float16), devs[1])
        if scales.dtype == torch.float16 and scales.device.type == "cpu":
            scales = scales.abs()
        grid, signs = make_grid(n, d, devs[2]), make_signs(group_size, devs[3])
        out_dtype = pick_dtype(rng.choice(floats))
        valid = (codes.dim() >= 1 and scales.dim() >= 1 and codes.dtype == torch.uint8
                 and scales.dtype == torch.float16 and out_dtype in floats and grid_ok(n, d, grid)
                 and group_ok(group_size, d, code_bits) and signs.dtype == torch.float32 and signs.dim() == 1
                 and signs.shape[0] == group_size and codes.shape[:-1] == scales.shape[:-1]
                 and codes.dim() == scales.dim() and codes.shape[-1] == scales.shape[-1] * group_bytes
                 and codes.device == scales.device == grid.device == signs.device)

        def check(out):
            assert out.shape == (*scales.shape[:-1], scales.shape[-1] * group_size) and out.dtype == out_dtype
            if codes.device.type == "cpu" and out.numel():
                args = (codes.numpy(), scales.numpy(), grid.numpy(), signs.numpy(), group_size)
                want64 = ref.higgs_dequantize(*args, dtype=np.float64)
                want32 = ref.higgs_dequantize(*args, dtype=np.float32, compute_dtype=np.float32)
                check_close(out, want64, want32, "higgs_dequantize")

        return ("higgs_dequantize", ops.higgs_dequantize, (codes, scales, grid, signs, group_size, out_dtype),
                valid, check)

    def pick_bits() -> int:
        return rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 16]) if rng.random() < 0.9 else rng.choice([0, 9, 15, 17, -1, 2**40])

    def gen_pack():
        bits = pick_bits()
        count = rng.choice([0, 1, 7, 8, 9, 33, 100])
        codes = tensor(maybe_0d((*lead_dims(), count)), pick_dtype(torch.int32), rng.choice(["cpu", "cpu", "meta"]),
                       noncontig=rng.random() < 0.2)
        valid = codes.dim() >= 1 and codes.dtype == torch.int32 and (1 <= bits <= 8 or bits == 16)

        def check(out):
            assert out.shape == (*codes.shape[:-1], (codes.shape[-1] * bits + 7) // 8) and out.dtype == torch.uint8
            if codes.device.type == "cpu":
                assert np.array_equal(out.numpy(), ref.pack_bits(codes.numpy(), bits))

        return "pack_bits", ops.pack_bits, (codes, bits), valid, check

    def gen_unpack():
        bits = pick_bits()
        count = rng.choice([0, 1, 7, 8, 9, 33, 100]) if rng.random() < 0.9 else rng.choice([-1, 2**58 + 1, 2**61,
                                                                                             2**63 - 1])
        want_bytes = (count * bits + 7) // 8 if count >= 0 and bits > 0 else 0
        nbytes = want_bytes if rng.random() < 0.85 else rng.choice([0, 1, 5])
        nbytes = max(0, min(nbytes, 4096))
        packed = tensor(maybe_0d((*lead_dims(), nbytes)), pick_dtype(torch.uint8), rng.choice(["cpu", "cpu", "meta"]),
                        noncontig=rng.random() < 0.2)
        valid = (packed.dim() >= 1 and packed.dtype == torch.uint8 and (1 <= bits <= 8 or bits == 16)
                 and 0 <= count <= 2**58 and packed.shape[-1] == (count * bits + 7) // 8)

        def check(out):
            assert out.shape == (*packed.shape[:-1], count) and out.dtype == torch.int32
            if packed.device.type == "cpu":
                assert np.array_equal(out.numpy(), ref.unpack_bits(packed.numpy(), bits, count))

        return "unpack_bits", ops.unpack_bits, (packed, bits, count), valid, check

    gens = [gen_hadamard, gen_quantize, gen_dequantize, gen_pack, gen_unpack]
    stats = {"valid": 0, "invalid": 0}
    problems: list[str] = []
    with open(log_path, "w") as log:
        for i in range(calls):
            name, fn, args, valid, check = rng.choice(gens)()
            desc = f"call {i}: {name}(" + ", ".join(
                f"{a.dtype}{list(a.shape)}@{a.device}" if isinstance(a, torch.Tensor) else repr(a) for a in args) + ")"
            log.write(desc + "\n")
            log.flush()  # survives a segfault: the parent reads the last line
            try:
                out = fn(*args)
            except (RuntimeError, ValueError, TypeError) as e:
                msg = str(e)
                if valid:
                    problems.append(f"{desc} is valid but raised {type(e).__name__}: {msg[:300]}")
                elif name not in msg:
                    problems.append(f"{desc}: the message does not name the op: {msg[:300]}")
                stats["invalid"] += 1
                continue
            except Exception as e:  # IndexError, ZeroDivisionError...: a check missing in front of the kernel
                problems.append(f"{desc} raised {type(e).__name__} (not a clean refusal): {str(e)[:300]}")
                continue
            if not valid:
                problems.append(f"{desc} is invalid but returned")
                continue
            try:
                check(out)
            except AssertionError as e:
                problems.append(f"{desc}: wrong result: {str(e)[:300]}")
            stats["valid"] += 1
    return {"stats": stats, "problems": problems}


# ---- the test (runs the worker in a subprocess) -------------------------------------------------


def test_fuzz_ops_in_a_subprocess(tmp_path: Path) -> None:
    log_path = tmp_path / "calls.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(SEED), str(FUZZ_CALLS), str(log_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        last = lines[-1] if lines else "(no call logged)"
        how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
        pytest.fail(f"fuzz worker died ({how}) during {last}\nstderr:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    stats, problems = result["stats"], result["problems"]
    assert not problems, f"{len(problems)} bad calls of {FUZZ_CALLS}:\n" + "\n".join(problems[:20])
    # The draw must exercise both sides; a generator bug that makes everything invalid would pass silently.
    assert stats["valid"] >= FUZZ_CALLS // 5 and stats["invalid"] >= FUZZ_CALLS // 5, stats


if __name__ == "__main__":
    seed, calls, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    print(json.dumps(worker(seed, calls, log)))
