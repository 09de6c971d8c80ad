"""Shared helpers for kernel-vs-reference tests: devices, seeded sweeps, and the comparison rules.

Used by tests/test_ops_cpu.py and (for the CUDA kernels) tests/test_ops_cuda.py. The rules:

* Codes are exact except at true near-ties. A kernel code k for sub-vector y_i is accepted iff it is
  the reference code, or ||y_i - g_k||^2 - min_j ||y_i - g_j||^2 <= CODE_TIE_TOL in the float64
  reference. Why 1e-4: the kernel computes y in float32 (error ~1e-6 relative after a log2(G)-deep
  butterfly) and ranks by <y, g> - ||g||^2/2 in float32; for the grids tested (|g| <= ~4) that moves
  a squared-distance difference by ~1e-5 at most, so 1e-4 leaves 10x headroom and still rejects any
  real mistake (the typical gap between best and second-best is ~1e-1). Measured on the CPU kernel over 136 sweep
  cases: 29 mismatches in 434k codes, the worst 5.6e-7 farther than the best.
* Scales are fp16(||x_g||): equal to the reference's up to one fp16 ulp (the float32 norm may sit
  on the other side of a rounding boundary than the float64 one).
* Floating outputs: err <= 2 * err_same_precision + half an ulp of the output dtype at the largest
  value, where err_same_precision is the error of the reference run in float32 and rounded to the
  output dtype (fast-hadamard-transform's rule: as good as an honest same-precision computation).
"""
from __future__ import annotations

import dataclasses

import aquakv.ops  # noqa: F401  (registers the ops and their fake kernels)
import numpy as np
import torch
from aquakv import reference as ref

CODE_TIE_TOL = 1e-4
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.aquakv.<op> has a kernel registered for dispatch_key ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aquakv::{op}", dispatch_key)


def devices(op: str = "higgs_quantize") -> list[str]:
    """Devices to run parity tests on: cpu, plus cuda when a GPU is present and the op has a CUDA kernel."""
    out = ["cpu"]
    if torch.cuda.is_available() and has_kernel(op, "CUDA"):
        out.append("cuda")
    return out


def to_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def dtype_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def random_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Test inputs that are not N(0, 1) alone: per-row scales over 4 decades and a few large outliers,
    like real KV rows (heavy-tailed channels). Rounded to `dtype`; references read the rounded values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if x.dim() >= 2:
        x = x * torch.exp(2.0 * torch.randn((*shape[:-1], 1), generator=gen, dtype=torch.float64))
    outliers = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.01
    x = torch.where(outliers, 20.0 * x, x)
    return x.to(dtype)


def random_grid(n: int, d: int, seed: int) -> torch.Tensor:
    """A random grid [n, d] (float32) spread like N(0, 1); grid optimality is not what kernels test."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, d), generator=gen, dtype=torch.float32) * 1.2


@dataclasses.dataclass(frozen=True)
class HiggsCase:
    lead: tuple[int, ...]  # leading dims of x
    channels: int  # C
    group_size: int  # G
    d: int  # grid dim
    n: int  # grid points
    dtype: torch.dtype
    seed: int

    @property
    def code_bits(self) -> int:
        """log2(n): bits of one d-dim code (code_bits / d bits per value)."""
        return self.n.bit_length() - 1

    def __str__(self) -> str:  # readable test ids
        lead = "x".join(map(str, self.lead)) or "1d"
        return f"{lead}-C{self.channels}-G{self.group_size}-d{self.d}n{self.n}-{str(self.dtype)[6:]}-s{self.seed}"

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [..., C], grid [n, d], signs [G]) on the CPU."""
        x = random_values((*self.lead, self.channels), self.dtype, self.seed)
        grid = random_grid(self.n, self.d, self.seed + 1)
        signs = torch.from_numpy(ref.random_signs(self.group_size, self.seed + 2))
        return x, grid, signs


def valid_group_sizes(d: int, n: int, lo: int = 16, hi: int = 4096) -> list[int]:
    code_bits = n.bit_length() - 1
    return [g for g in (2**k for k in range(1, 16)) if lo <= g <= hi and g % d == 0 and (g // d * code_bits) % 8 == 0]


def higgs_cases(count: int, seed: int = 0, max_values: int = 1 << 14) -> list[HiggsCase]:
    """`count` seeded random valid cases covering d in {1, 2, 4}, n in {2..256}, G in 16..4096,
    odd leading dims, every float dtype; at most `max_values` values each to keep the suite fast."""
    rng = np.random.default_rng(seed)
    leads = [(), (1,), (3,), (7,), (2, 5), (3, 1, 3), (13,)]
    cases = []
    for i in range(count):
        d = int(rng.choice([1, 2, 4]))
        n = int(rng.choice([2, 4, 16, 64, 256]))
        group_size = int(rng.choice(valid_group_sizes(d, n)))
        lead = leads[int(rng.integers(len(leads)))]
        rows = int(np.prod(lead)) if lead else 1
        max_groups = max(1, max_values // (group_size * rows))
        groups = int(rng.integers(1, min(4, max_groups) + 1))
        rows_fit = max(1, max_values // (group_size * groups))
        if rows > rows_fit:
            lead = (rows_fit,) if rows_fit % 2 else (max(1, rows_fit - 1),)  # keep it odd when possible
        dtype = FLOAT_DTYPES[i % len(FLOAT_DTYPES)]
        cases.append(HiggsCase(lead, groups * group_size, group_size, d, n, dtype, seed=1000 * seed + i))
    return cases


# ---- comparison rules -------------------------------------------------------------------------


def check_codes(codes: torch.Tensor, x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, group_size: int) -> int:
    """Assert packed kernel codes equal the reference's except at near-ties (rule in the module doc).

    Returns the number of near-tie mismatches (for reporting). Groups with a zero norm are included:
    their y is 0 and ties among equally short grid points go to the lowest index.
    """
    grid64 = to_f64(grid)
    n, d = grid64.shape
    code_bits = n.bit_length() - 1
    y, _ = ref.higgs.rotated_normalised(to_f64(x), to_f64(signs), group_size)
    y = y.reshape(-1, d)
    want, _ = ref.nearest_grid_codes(y, grid64)
    got = ref.unpack_bits(codes.cpu().numpy(), code_bits, x.shape[-1] // d).reshape(-1).astype(np.int64)
    assert got.shape == want.shape, (got.shape, want.shape)
    differ = np.flatnonzero(got != want)
    if differ.size:
        dist = lambda idx: ((y[differ] - grid64[idx]) ** 2).sum(-1)  # noqa: E731
        excess = dist(got[differ]) - dist(want[differ])
        worst = int(np.argmax(excess))
        assert excess.max() <= CODE_TIE_TOL, (
            f"{differ.size} codes differ; worst at sub-vector {differ[worst]}: kernel {got[differ][worst]} is "
            f"{excess[worst]:.3g} farther than reference {want[differ][worst]} (near-tie tolerance {CODE_TIE_TOL})"
        )
    return int(differ.size)


def check_scales(scales: torch.Tensor, x: torch.Tensor, group_size: int) -> None:
    """Assert fp16 scales equal fp16(||x_g||) of the float64 reference up to one fp16 ulp."""
    assert scales.dtype == torch.float16
    xg = to_f64(x).reshape(*x.shape[:-1], -1, group_size)
    want = np.sqrt((xg**2).sum(-1)).astype(np.float16)
    got = scales.cpu().numpy()
    ulp = np.spacing(np.abs(want))
    bad = np.abs(got.astype(np.float64) - want.astype(np.float64)) > ulp.astype(np.float64)
    assert not bad.any(), f"scales off by more than 1 fp16 ulp at {np.argwhere(bad)[:5].tolist()}"


def float_budget(ref64: np.ndarray, ref32: np.ndarray, out_dtype: torch.dtype) -> float:
    """Error budget for a floating kernel output: 2 * same-precision error + half an ulp at the max value."""
    same = torch.from_numpy(np.ascontiguousarray(ref32, dtype=np.float32)).to(out_dtype).double().numpy()
    err_same = float(np.abs(same - ref64).max(initial=0.0))
    return 2.0 * err_same + 0.5 * dtype_eps(out_dtype) * float(np.abs(ref64).max(initial=0.0))


def check_close(got: torch.Tensor, ref64: np.ndarray, ref32: np.ndarray, what: str) -> None:
    budget = float_budget(ref64, ref32, got.dtype)
    err = float(np.abs(to_f64(got) - ref64).max(initial=0.0))
    assert err <= budget, f"{what}: max error {err:.3g} > budget {budget:.3g} (2 x same-precision error + 0.5 ulp)"
