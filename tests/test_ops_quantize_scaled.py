"""higgs_quantize_scaled: higgs_quantize's nearest-grid search under given scales, against the NumPy reference.

Codes follow the rule of tests/sweeps.py: exact except at true near-ties (CODE_TIE_TOL on the float64
squared distances). The given scales here are the group norms times a factor in [0.5, 2], so y stays
within 2x of higgs_quantize's (|y| ~ sqrt(G)) and the float32 score error within 2x of what that
tolerance was sized for (10x headroom there). Helpers are shared with tests/test_cuda_emulated.py.
"""
from __future__ import annotations

import math

import aquakv.ops as ops
import numpy as np
import pytest
import torch
from aquakv import reference as ref
from sweeps import (
    CODE_TIE_TOL,
    devices,
    higgs_cases,
    random_grid,
    random_values,
    to_f64,
)

CASES = higgs_cases(30, seed=3)


def given_scales(x: torch.Tensor, group_size: int, seed: int) -> torch.Tensor:
    """fp16 scales near the group norms: norm * U(0.5, 2), one group zeroed and one negated when there are a few."""
    gen = torch.Generator().manual_seed(seed)
    norms = x.double().reshape(*x.shape[:-1], -1, group_size).norm(dim=-1)
    s = norms * torch.exp(torch.empty_like(norms).uniform_(math.log(0.5), math.log(2.0), generator=gen))
    flat = s.view(-1)
    if flat.numel() >= 3:
        flat[1] = 0.0  # y = 0: the code of the grid point nearest the origin
        flat[2] = -flat[2]  # a negative scale mirrors y
    return s.half()


def check_scaled_codes(codes: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor,
                       signs: torch.Tensor, group_size: int) -> int:
    """Assert kernel codes equal the reference's except at near-ties; returns the near-tie count."""
    grid64 = to_f64(grid)
    n, d = grid64.shape
    y = ref.higgs.rotated_scaled(to_f64(x), scales.cpu().numpy(), to_f64(signs), group_size).reshape(-1, d)
    want, _ = ref.nearest_grid_codes(y, grid64)
    got = ref.unpack_bits(codes.cpu().numpy(), n.bit_length() - 1, x.shape[-1] // d).reshape(-1).astype(np.int64)
    differ = np.flatnonzero(got != want)
    if differ.size:
        dist = lambda idx: ((y[differ] - grid64[idx]) ** 2).sum(-1)  # noqa: E731
        excess = dist(got[differ]) - dist(want[differ])
        assert excess.max() <= CODE_TIE_TOL, f"{differ.size} codes differ, worst {excess.max():.3g} > {CODE_TIE_TOL}"
    return int(differ.size)


@pytest.mark.parametrize("device", devices("higgs_quantize_scaled"))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_codes_match_reference_except_ties(device: str, case) -> None:
    x, grid, signs = case.inputs()
    scales = given_scales(x, case.group_size, case.seed)
    codes = ops.higgs_quantize_scaled(x.to(device), scales.to(device), grid.to(device), signs.to(device),
                                      case.group_size)
    assert codes.dtype == torch.uint8 and codes.shape == (*x.shape[:-1], x.shape[-1] // case.d * case.code_bits // 8)
    ties = check_scaled_codes(codes, x, scales, grid, signs, case.group_size)
    assert ties <= max(2, x.numel() // case.d // 100), f"{ties} near-tie mismatches"


def test_scale_one_is_the_unnormalised_search_and_special_scales() -> None:
    grid = random_grid(16, 2, seed=1)
    signs = torch.from_numpy(ref.random_signs(64, seed=2))
    x = random_values((4, 128), torch.float32, seed=3)
    scales = torch.tensor([[1.0, 0.0], [math.nan, math.inf], [2.0, -2.0], [1.0, 1.0]]).half()
    codes = ref.unpack_bits(ops.higgs_quantize_scaled(x, scales, grid, signs, 64).numpy(), 4, 64)
    nearest_origin = int(np.argmin((grid.double() ** 2).sum(-1).numpy()))
    assert (codes[0, 32:] == nearest_origin).all() and (codes[1, 32:] == nearest_origin).all()  # s = 0, s = inf
    assert (codes[1, :32] == 0).all()  # NaN: no score wins, code 0


def test_round_trip_under_given_scales_beats_random_codes() -> None:
    # Decoding the codes under the same scales reconstructs x about as well as higgs_quantize does.
    grid = torch.from_numpy(np.stack(np.meshgrid(*[np.linspace(-2, 2, 4)] * 2), -1).reshape(-1, 2)).float()
    signs = torch.from_numpy(ref.random_signs(64, seed=4))
    x = random_values((8, 256), torch.float32, seed=5)
    _, scales = ops.higgs_quantize(x, grid, signs, 64)
    codes = ops.higgs_quantize_scaled(x, scales, grid, signs, 64)
    err = (ops.higgs_dequantize(codes, scales, grid, signs, 64) - x).norm() / x.norm()
    junk = torch.randint_like(codes, 0, 256)
    junk_err = (ops.higgs_dequantize(junk, scales, grid, signs, 64) - x).norm() / x.norm()
    assert err < 0.5 * junk_err, (float(err), float(junk_err))


GRID, SIGNS, X = random_grid(16, 2, seed=0), torch.from_numpy(ref.random_signs(128, seed=0)), torch.randn(3, 256)
SCALES = X.reshape(3, 2, 128).norm(dim=-1).half()

BAD = [
    (dict(x=X[:, :192], scales=SCALES[:, :1]), "higgs_quantize_scaled: last dim 192 is not a multiple of group_size"),
    (dict(x=X.double()), "higgs_quantize_scaled: x must be float32, float16 or bfloat16, got torch.float64"),
    (dict(scales=SCALES.float()), "higgs_quantize_scaled: scales must be torch.float16, got torch.float32"),
    (dict(scales=torch.tensor(1.0).half()), "higgs_quantize_scaled: scales must have at least 1 dim"),
    (dict(scales=SCALES[:2]), "higgs_quantize_scaled: scales must be \\[..., C/group_size\\] = \\[3, 2\\] \\(x's "
     "leading dims\\), got shape \\[2, 2\\]"),
    (dict(scales=SCALES[:, :1]), "higgs_quantize_scaled: scales must be \\[..., C/group_size\\] = \\[3, 2\\]"),
    (dict(grid=GRID.half()), "higgs_quantize_scaled: grid must be torch.float32, got torch.float16"),
    (dict(signs=SIGNS[:64]), "higgs_quantize_scaled: signs must be 1-D of length group_size = 128"),
    (dict(group_size=96, signs=SIGNS[:96]), "higgs_quantize_scaled: group_size 96 must be a power of two"),
]


@pytest.mark.parametrize("override,message", BAD, ids=lambda v: v[:60] if isinstance(v, str) else None)
def test_bad_inputs_are_refused_the_same_on_the_fake_kernel(override: dict, message: str) -> None:
    args = dict(x=X, scales=SCALES, grid=GRID, signs=SIGNS, group_size=128) | override
    with pytest.raises(RuntimeError, match=message) as real:
        ops.higgs_quantize_scaled(**args)
    with pytest.raises(RuntimeError) as fake:
        ops.higgs_quantize_scaled(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert str(fake.value) == str(real.value)


@pytest.mark.parametrize("name", ["x", "scales", "grid", "signs"])
def test_one_tensor_on_meta_is_refused_by_name(name: str) -> None:
    args = dict(x=X, scales=SCALES, grid=GRID, signs=SIGNS, group_size=128)
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=f"higgs_quantize_scaled: .*{name} is on meta"):
        ops.higgs_quantize_scaled(**args)


@pytest.mark.parametrize("device", devices("higgs_quantize_scaled"))
def test_empty_opcheck_and_no_gradient(device: str) -> None:
    codes = ops.higgs_quantize_scaled(torch.empty(0, 256, device=device), torch.empty(0, 2, device=device).half(),
                                      GRID.to(device), SIGNS.to(device), 128)
    assert codes.shape == (0, 64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = X.to(device, dtype)
        torch.library.opcheck(torch.ops.aquakv.higgs_quantize_scaled.default,
                              (x, SCALES.to(device), GRID.to(device), SIGNS.to(device), 128))
    x = X.to(device).requires_grad_()
    codes = ops.higgs_quantize_scaled(x, SCALES.to(device), GRID.to(device), SIGNS.to(device), 128)
    assert not codes.requires_grad
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aquakv::higgs_quantize_scaled", "Autograd")
