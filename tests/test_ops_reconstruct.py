"""aqua_reconstruct against the NumPy reference (aquakv.reference.aqua) over seeded random shapes and values.

Tolerance: the shared float rule of tests/sweeps.py (check_close): error <= 2 x the error of the same
computation done honestly in float32 (the reference with compute_dtype=float32: NumPy's float32 einsum
for the matmuls, float32 dequantize and RoPE) + half an ulp of the output dtype at the largest value.
Why that is the right size: the kernel's matmul (MKL / cuBLAS) sums the C_i products in a different
order than NumPy, so each dot product may differ by a few float32 ulps of sum |x w|, which is what the
float32 reference's own error measures; the epilogue then adds r and bias, rotates (two products and one
sum per value) and rounds once to fp16/bf16 (the half-ulp term). A second rounding, a wrong head, group
or partner index would cost whole ulps of the output dtype or O(1) errors, far above the budget.
Without inputs there is no matmul: the op must then equal, bit for bit, the composition of the existing
ops (higgs_dequantize, + bias, RoPE in torch, one cast), which is the float32 computation it fuses.
Helpers here are shared with tests/test_cuda_emulated.py.
"""
from __future__ import annotations

import dataclasses

import aquakv.ops as ops
import numpy as np
import pytest
import torch
from aquakv import reference as ref
from sweeps import (
    FLOAT_DTYPES,
    check_close,
    float_budget,
    devices,
    random_grid,
    random_values,
    to_f64,
    valid_group_sizes,
)


@dataclasses.dataclass(frozen=True)
class ReconCase:
    batch: int
    tokens: int
    heads: int
    head_dim: int
    group_size: int  # HIGGS group of the residual
    d: int
    n: int
    in_widths: tuple[int, ...]  # C_i of each input (empty: intercept only)
    pred_groups: int  # G of the predictor
    rank: int | None  # None: full M = C/G
    rotated: bool
    dtype: torch.dtype
    out_layout: str  # "contiguous", "slice" (of a longer token buffer) or "bthd" (a permuted [B, T, H, D])
    hat_layout: str  # "none", "contiguous" or "strided"
    seed: int

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def __str__(self) -> str:
        up = f"r{self.rank}" if self.rank else "full"
        ins = "+".join(map(str, self.in_widths)) or "bias"
        return (f"B{self.batch}T{self.tokens}H{self.heads}D{self.head_dim}-G{self.group_size}d{self.d}n{self.n}-"
                f"{ins}-g{self.pred_groups}{up}-{'rope' if self.rotated else 'norope'}-{str(self.dtype)[6:]}-"
                f"{self.out_layout}-hat{self.hat_layout}-s{self.seed}")

    def tensors(self, device: str = "cpu") -> dict:
        """Every argument of ops.aqua_reconstruct on `device`, out and hat_out filled with NaN."""
        gen = torch.Generator().manual_seed(self.seed)
        b, t, c, g = self.batch, self.tokens, self.channels, self.pred_groups
        grid = random_grid(self.n, self.d, self.seed + 1)
        signs = torch.from_numpy(ref.random_signs(self.group_size, self.seed + 2))
        code_bytes = c // self.d * (self.n.bit_length() - 1) // 8
        codes = torch.randint(0, 256, (b, t, code_bytes), generator=gen, dtype=torch.uint8)  # every byte is valid
        scales = random_values((b, t, c // self.group_size), torch.float32, self.seed + 3).abs().half()
        inputs = [random_values((b, t, w), torch.float32, self.seed + 4 + i) for i, w in enumerate(self.in_widths)]
        inner = self.rank or c // g
        weights = [torch.randn((g, w // g, inner), generator=gen) / (w // g) ** 0.5 for w in self.in_widths]
        up = torch.randn((g, self.rank, c // g), generator=gen) / self.rank**0.5 if self.rank else None
        bias = torch.randn(c, generator=gen)
        cos = sin = None
        if self.rotated:
            angles = torch.rand((b, t, self.head_dim), generator=gen) * 6.3
            cos, sin = angles.cos(), angles.sin()
        on = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return dict(codes=on(codes), scales=on(scales), grid=on(grid), signs=on(signs), group_size=self.group_size,
                    inputs=[on(x) for x in inputs], weights=[on(w) for w in weights], up=on(up), bias=on(bias),
                    cos=on(cos), sin=on(sin), out=self.out_buffer(device), hat_out=self.hat_buffer(device))

    def out_buffer(self, device: str = "cpu") -> torch.Tensor:
        b, h, t, dd = self.batch, self.heads, self.tokens, self.head_dim
        full = lambda *shape: torch.full(shape, torch.nan, dtype=self.dtype, device=device)  # noqa: E731
        if self.out_layout == "slice":
            return full(b, h, t + 5, dd)[:, :, 2 : 2 + t]
        if self.out_layout == "bthd":
            return full(b, t, h, dd).permute(0, 2, 1, 3)
        return full(b, h, t, dd)

    def hat_buffer(self, device: str = "cpu") -> torch.Tensor | None:
        b, t, c = self.batch, self.tokens, self.channels
        if self.hat_layout == "strided":
            return torch.full((b, t, 2 * c), torch.nan, device=device)[..., ::2]
        return torch.full((b, t, c), torch.nan, device=device) if self.hat_layout == "contiguous" else None


def reference(args: dict, head_dim: int, compute_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(out [B, H, T, D], hat [B, T, C]) of the NumPy reference in compute_dtype."""
    opt = lambda t: None if t is None else to_f64(t)  # noqa: E731
    return ref.aqua_reconstruct(
        args["codes"].numpy(), args["scales"].numpy(), to_f64(args["grid"]), to_f64(args["signs"]), args["group_size"],
        [to_f64(x) for x in args["inputs"]], [to_f64(w) for w in args["weights"]], opt(args["up"]), to_f64(args["bias"]),
        opt(args["cos"]), opt(args["sin"]), head_dim, compute_dtype=compute_dtype)


def check_against_reference(case: ReconCase, args: dict, out: torch.Tensor, hat: torch.Tensor | None) -> None:
    out64, hat64 = reference(args, case.head_dim, np.float64)
    out32, hat32 = reference(args, case.head_dim, np.float32)
    check_close(out, out64, out32, f"aqua_reconstruct out {case}")
    if hat is not None:
        check_close(hat, hat64, hat32, f"aqua_reconstruct hat_out {case}")


def composed(args: dict, pred: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 computation the op fuses, from the existing ops and torch: (out, hat). pred [B, T, C]."""
    r = ops.higgs_dequantize(args["codes"], args["scales"], args["grid"], args["signs"], args["group_size"])
    hat = ((torch.zeros_like(r) if pred is None else pred) + args["bias"]) + r
    b, t, c = hat.shape
    dd = args["out"].shape[-1]
    x = hat.reshape(b, t, c // dd, dd).transpose(1, 2)
    if args["cos"] is not None:
        cos, sin = args["cos"][:, None], args["sin"][:, None]
        rotated = torch.cat([-x[..., dd // 2 :], x[..., : dd // 2]], dim=-1)
        x = x * cos + rotated * sin
    return x.to(args["out"].dtype), hat


def recon_cases(count: int, seed: int, max_values: int = 1 << 13) -> list[ReconCase]:
    """Seeded random valid cases: every dtype, layouts, 0-2 inputs, dense / per-head / other G, low rank."""
    rng = np.random.default_rng(seed)
    cases: list[ReconCase] = []
    while len(cases) < count:
        i = len(cases)
        head_dim = int(rng.choice([2, 4, 8, 16, 32, 48, 64, 80, 128]))
        heads = int(rng.choice([1, 2, 3, 4]))
        c = heads * head_dim
        d, n = int(rng.choice([1, 2, 4])), int(rng.choice([4, 16, 256]))
        sizes = [g for g in valid_group_sizes(d, n, lo=2, hi=c) if c % g == 0]
        if not sizes:
            continue
        groups = [g for g in {1, heads, 2, 4, heads * 2} if c % g == 0]
        pred_groups = int(rng.choice(groups))
        n_inputs = int(rng.choice([0, 1, 2, 2]))
        in_widths = tuple(int(c if rng.random() < 0.6 else pred_groups * rng.integers(1, 40)) for _ in range(n_inputs))
        rank = int(rng.choice([1, 4, 9])) if n_inputs and rng.random() < 0.35 else None
        batch, tokens = int(rng.choice([1, 2, 3])), int(rng.choice([1, 3, 8, 17]))
        if batch * tokens * max((c, *in_widths)) > max_values:
            tokens = max(1, max_values // (batch * max((c, *in_widths))))
        cases.append(ReconCase(
            batch, tokens, heads, head_dim, int(rng.choice(sizes)), d, n, in_widths, pred_groups, rank,
            rotated=bool(rng.random() < 0.7), dtype=FLOAT_DTYPES[i % 3],
            out_layout=str(rng.choice(["contiguous", "slice", "bthd"])),
            hat_layout=str(rng.choice(["none", "contiguous", "strided"])), seed=1000 * seed + i))
    return cases


CASES = recon_cases(60, seed=0)


@pytest.mark.parametrize("device", devices("aqua_reconstruct"))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reconstruct_matches_reference(device: str, case: ReconCase) -> None:
    args = case.tensors(device)
    assert ops.aqua_reconstruct(**args) is args["out"]
    out, hat = args["out"].cpu(), None if args["hat_out"] is None else args["hat_out"].cpu()
    assert out.dtype == case.dtype and not torch.isnan(out).any(), "out has unwritten (NaN) values"
    check_against_reference(case, case.tensors(), out, hat)


@pytest.mark.parametrize("case", [c for c in CASES if not c.in_widths][:12], ids=str)
def test_intercept_only_is_bitwise_the_composition_of_the_ops(case: ReconCase) -> None:
    args = case.tensors()
    ops.aqua_reconstruct(**args)
    want_out, want_hat = composed(args)
    assert torch.equal(args["out"], want_out)
    if args["hat_out"] is not None:
        assert torch.equal(args["hat_out"], want_hat)


@pytest.mark.parametrize("n", [4, 16, 64, 256])
def test_d2_lookup_table_is_bitwise_the_butterfly(n: int) -> None:
    # d = 2 grids with groups of >= 8 take the CPU kernel's table path (grid lookup and the first three
    # FWHT stages as four table rows); smaller groups take the plain lookup + FWHT. Both must give the
    # bits of higgs_dequantize's butterfly.
    sizes = valid_group_sizes(2, n, lo=2, hi=128)
    assert any(g >= 8 for g in sizes)  # n = 16 and 256 also have groups of 4 (the plain path)
    for group_size in sizes:
        for i, dtype in enumerate(FLOAT_DTYPES):
            case = ReconCase(2, 9, 2, 64, group_size, 2, n, (), 1, None, i != 1, dtype, "contiguous", "contiguous",
                             seed=40 + i + n + group_size)
            args = case.tensors()
            ops.aqua_reconstruct(**args)
            want_out, want_hat = composed(args)
            assert torch.equal(args["out"], want_out) and torch.equal(args["hat_out"], want_hat), str(case)


def test_writes_only_its_slice_of_the_buffer() -> None:
    case = ReconCase(2, 5, 2, 64, 64, 2, 16, (128,), 2, None, True, torch.float16, "contiguous", "none", seed=7)
    args = case.tensors()
    buffer = torch.full((2, 2, 12, 64), -7.0, dtype=torch.float16)
    args["out"] = buffer[:, :, 4:9]
    ops.aqua_reconstruct(**args)
    assert (buffer[:, :, :4] == -7).all() and (buffer[:, :, 9:] == -7).all()
    check_against_reference(case, args, buffer[:, :, 4:9], None)


def test_block_diagonal_map_keeps_heads_apart() -> None:
    # G = H: head 1's outputs must not move when only head 0's inputs change.
    case = ReconCase(1, 4, 2, 32, 32, 1, 16, (64,), 2, None, False, torch.float32, "contiguous", "none", seed=8)
    args = case.tensors()
    ops.aqua_reconstruct(**args)
    before = args["out"].clone()
    args["inputs"][0][..., :32] += 5.0
    ops.aqua_reconstruct(**args)
    assert torch.equal(args["out"][:, 1], before[:, 1]) and not torch.equal(args["out"][:, 0], before[:, 0])


@pytest.mark.parametrize("device", devices("aqua_reconstruct"))
@pytest.mark.parametrize("empty", ["batch", "tokens"])
def test_empty_rows_write_nothing(device: str, empty: str) -> None:
    b, t = (0, 3) if empty == "batch" else (2, 0)
    case = ReconCase(b, t, 2, 16, 16, 2, 16, (32,), 2, None, True, torch.float16, "contiguous", "contiguous", seed=9)
    args = case.tensors(device)
    assert ops.aqua_reconstruct(**args).shape == (b, 2, t, 16)


def test_non_contiguous_arguments_give_the_same_bits() -> None:
    case = ReconCase(2, 3, 2, 16, 16, 2, 16, (32, 32), 1, 4, True, torch.bfloat16, "contiguous", "none", seed=10)
    args = case.tensors()
    ops.aqua_reconstruct(**args)
    strided = dict(args, out=case.out_buffer())
    for key in ("codes", "scales", "bias", "cos", "sin", "up", "grid"):
        t = args[key]
        strided[key] = torch.stack([t, t], dim=-1)[..., 0]  # same values, stride 2 in the last dim
    strided["inputs"] = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in args["inputs"]]
    ops.aqua_reconstruct(**strided)
    assert torch.equal(strided["out"], args["out"])


def bfloat16_prediction(args: dict) -> dict:
    """The same call with the prediction in bfloat16: inputs, weights and up rounded to it."""
    bf = lambda t: None if t is None else t.bfloat16()  # noqa: E731
    return dict(args, inputs=[bf(x) for x in args["inputs"]], weights=[bf(w) for w in args["weights"]],
                up=bf(args["up"]))


def bfloat16_error_bound(args: dict, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """What rounding the prediction to bfloat16 may cost, per value of (out, hat), on top of the float32 budget.

    The one matmul over the concatenated inputs accumulates in float32 and is rounded once to bfloat16 (relative
    error <= 2**-9); with up, that rounded result is carried through |up| and the low-rank product rounded once more.
    All of it is bounded by 2**-7 * the prediction computed from |inputs|, |weights| and |up| (no bias): two 2**-9
    roundings deep, with room for the float32 accumulation order. RoPE mixes a channel with its partner
    (|cos|, |sin| <= 1), so out's bound is the sum of the two channels' bounds: 2 x the head's largest."""
    absolute = lambda t: None if t is None else np.abs(to_f64(t.float()))  # noqa: E731
    bound = ref.aqua_prediction([absolute(x) for x in args["inputs"]], [absolute(w) for w in args["weights"]],
                                absolute(args["up"]), np.zeros(args["bias"].shape[0])) * 2.0**-7
    b, t, c = bound.shape
    per_head = bound.reshape(b, t, c // head_dim, head_dim).max(axis=-1, keepdims=True).transpose(0, 2, 1, 3)
    return 2 * np.broadcast_to(per_head, (b, c // head_dim, t, head_dim)), bound


@pytest.mark.parametrize("device", devices("aqua_reconstruct"))
@pytest.mark.parametrize("case", [c for c in CASES if c.in_widths][:24], ids=str)
def test_bfloat16_prediction_matches_reference(device: str, case: ReconCase) -> None:
    # The reference takes the bfloat16-rounded inputs and weights exactly (float64 inside); the op's differences
    # from it are the float32 budget of test_reconstruct_matches_reference plus the bfloat16 roundings.
    args = bfloat16_prediction(case.tensors(device))
    ops.aqua_reconstruct(**args)
    host = bfloat16_prediction(case.tensors())
    out64, hat64 = reference(host, case.head_dim, np.float64)
    out32, hat32 = reference(host, case.head_dim, np.float32)
    out_bound, hat_bound = bfloat16_error_bound(host, case.head_dim)
    pairs = [(args["out"].cpu(), out64, out32, out_bound)]
    if args["hat_out"] is not None:
        pairs.append((args["hat_out"].cpu(), hat64, hat32, hat_bound))
    for got, ref64, ref32, bound in pairs:
        err = np.abs(to_f64(got) - ref64) - bound
        budget = float_budget(ref64, ref32, got.dtype)
        assert float(err.max(initial=0.0)) <= budget, f"{case}: bfloat16 prediction off the reference beyond its bound"


def test_bfloat16_prediction_rounds_the_products() -> None:
    # Not a float32 matmul in disguise: the bfloat16 result differs from float32 over the same rounded operands.
    case = ReconCase(2, 17, 2, 64, 64, 2, 16, (128, 128), 1, None, True, torch.float32, "contiguous", "contiguous",
                     seed=11)
    args = bfloat16_prediction(case.tensors())
    ops.aqua_reconstruct(**args)
    as_float = {k: v for k, v in args.items()}
    as_float.update(inputs=[x.float() for x in args["inputs"]], weights=[w.float() for w in args["weights"]],
                    out=case.out_buffer(), hat_out=case.hat_buffer())
    ops.aqua_reconstruct(**as_float)
    diff = (args["hat_out"] - as_float["hat_out"]).abs().max().item()
    assert 0 < diff <= 2.0**-7 * as_float["hat_out"].abs().max().item() * 4
