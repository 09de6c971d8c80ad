"""The NumPy reference is the truth the kernels are held to; these tests hold the reference to docs/method.md."""
from __future__ import annotations

import numpy as np
import pytest
from aquakv import reference as ref

# ---- Hadamard ---------------------------------------------------------------------------------


def sylvester_by_kron(n: int) -> np.ndarray:
    """H_n = H_2 (x) H_{n/2}: an independent construction to check against."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_hadamard_matrix_is_sylvester_and_orthogonal(n: int) -> None:
    h = ref.hadamard_matrix(n)
    np.testing.assert_array_equal(h, sylvester_by_kron(n))
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))  # +-1 entries: exact in float64
    np.testing.assert_array_equal(h, h.T)


def test_hadamard_matrix_small_case_by_hand() -> None:
    np.testing.assert_array_equal(
        ref.hadamard_matrix(4), [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    )


@pytest.mark.parametrize("n", [2, 8, 128, 1024])
def test_butterfly_equals_matrix_with_signs_and_scale(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, 2, n))
    signs = ref.random_signs(n, seed=n)
    got = ref.hadamard(x, signs, scale=0.5)
    want = 0.5 * (x * signs) @ ref.hadamard_matrix(n).T
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * n)  # float64: only summation order differs


@pytest.mark.parametrize("n", [2, 64, 32768])
def test_orthonormal_hadamard_is_an_involution_and_keeps_norms(n: int) -> None:
    x = np.random.default_rng(0).standard_normal((2, n))
    y = ref.hadamard(x, None, n**-0.5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(ref.hadamard(y, None, n**-0.5), x, rtol=0, atol=1e-12)


def test_hadamard_rejects_non_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        ref.hadamard(np.ones(12))


def test_random_signs_definition() -> None:
    s = ref.random_signs(1000, seed=7)
    assert s.dtype == np.float32 and s.shape == (1000,)
    assert set(np.unique(s)) == {-1.0, 1.0}
    want = 1.0 - 2.0 * np.random.default_rng(7).integers(0, 2, size=1000)
    np.testing.assert_array_equal(s, want.astype(np.float32))
    np.testing.assert_array_equal(ref.random_signs(1000, seed=7), s)  # deterministic
    assert not np.array_equal(ref.random_signs(1000, seed=8), s)
    np.testing.assert_array_equal(ref.random_signs(5, seed=7), s[:5])  # a prefix of the longer draw


# ---- bit packing ------------------------------------------------------------------------------

# Hand-worked layouts: code i fills bits [i*b, (i+1)*b), bit k sits in bit k%8 of byte k//8.
HAND_CASES = [
    # bits, codes, bytes
    (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00001101, 0b00000001]),
    (2, [3, 0, 1, 2], [0b10010011]),
    (3, [1, 2, 3, 4, 5, 6, 7, 0], [0b11010001, 0b01011000, 0b00011111]),
    (4, [0x1, 0x2, 0xF], [0x21, 0x0F]),
    (5, [31, 1], [0x3F, 0x00]),
    (8, [0, 255, 17], [0, 255, 17]),
    (16, [0x1234, 0xFFFF], [0x34, 0x12, 0xFF, 0xFF]),
]


@pytest.mark.parametrize("bits,codes,packed", HAND_CASES)
def test_pack_bits_hand_checked(bits: int, codes: list[int], packed: list[int]) -> None:
    np.testing.assert_array_equal(ref.pack_bits(np.array(codes), bits), np.array(packed, np.uint8))
    np.testing.assert_array_equal(ref.unpack_bits(np.array(packed, np.uint8), bits, len(codes)), codes)


def test_pack_bits_keeps_only_low_bits() -> None:
    np.testing.assert_array_equal(ref.pack_bits(np.array([0b1111_0101, -1]), 4), [0xF5])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("count", [1, 99, 999])
def test_pack_unpack_round_trip(bits: int, count: int) -> None:
    codes = np.random.default_rng(bits + count).integers(0, 2**bits, size=(2, 3, count))
    packed = ref.pack_bits(codes, bits)
    assert packed.shape == (2, 3, (count * bits + 7) // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(ref.unpack_bits(packed, bits, count), codes)


def test_unpack_rejects_wrong_byte_count() -> None:
    with pytest.raises(ValueError, match="packed last dim"):
        ref.unpack_bits(np.zeros(3, np.uint8), 4, 8)


# ---- HIGGS ------------------------------------------------------------------------------------


def test_nearest_grid_codes_brute_force_and_margin() -> None:
    grid = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])  # point 3 duplicates point 1
    y = np.array([[0.1, 0.1], [0.9, 0.2], [0.0, 1.5], [0.5, 0.0]])
    codes, margin = ref.nearest_grid_codes(y, grid)
    np.testing.assert_array_equal(codes, [0, 1, 2, 0])  # [0.9, 0.2]: tie 1 vs 3 -> lowest; [0.5, 0]: 0 vs 1 tie
    np.testing.assert_allclose(margin, [0.8, 0.0, 2.0, 0.0], atol=1e-12)  # [0, 1.5]: 2.25 - 0.25


def test_quantize_shapes_and_normalisation() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 256)) * rng.exponential(size=(3, 5, 1))
    grid = rng.standard_normal((16, 2))
    signs = ref.random_signs(128, seed=1)
    codes, scales = ref.higgs_quantize(x, grid, signs, 128)
    assert codes.shape == (3, 5, 256 // 2 * 4 // 8) and codes.dtype == np.uint8
    assert scales.shape == (3, 5, 2) and scales.dtype == np.float16
    y, s = ref.higgs.rotated_normalised(x, signs, 128)
    np.testing.assert_allclose((y**2).sum(-1), 128.0, rtol=1e-12)  # ||y||^2 = G: y is unit-variance on average
    np.testing.assert_allclose(scales, s.astype(np.float16))


def test_round_trip_error_is_the_rotated_grid_error() -> None:
    # Orthonormal rotation: ||x_g - x^_g||^2 = s^2/G * ||y - y^||^2 exactly when the fp16 scale is exact,
    # which it is for groups scaled to norm 4 (a power of two).
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 64))
    x = 4.0 * x / np.linalg.norm(x, axis=-1, keepdims=True)
    grid = rng.standard_normal((64, 2))
    signs = ref.random_signs(64, seed=2)
    codes, scales = ref.higgs_quantize(x, grid, signs, 64)
    assert (scales == 4.0).all()
    x_hat = ref.higgs_dequantize(codes, scales, grid, signs, 64, dtype=np.float64)
    y, _ = ref.higgs.rotated_normalised(x, signs, 64)
    idx = ref.unpack_bits(codes, 6, 32)
    y_err = ((y.reshape(6, 32, 2) - grid[idx]) ** 2).sum(axis=(-1, -2))
    np.testing.assert_allclose(((x - x_hat) ** 2).sum(-1), 16.0 / 64 * y_err, rtol=1e-10)


def test_zero_group_is_exactly_zero_never_nan() -> None:
    x = np.zeros((2, 32))
    x[1, :16] = np.arange(16.0)
    grid = np.array([[-1.0], [0.5], [-0.5], [1.0]])
    codes, scales = ref.higgs_quantize(x, grid, ref.random_signs(16, seed=0), 16)
    assert scales[0, 0] == 0 and scales[0, 1] == 0 and scales[1, 1] == 0 and scales[1, 0] > 0
    # y = 0: the nearest points are 0.5 and -0.5 (a tie) -> index 1, the lower one; 2-bit codes 01 -> 0x55.
    np.testing.assert_array_equal(codes[0], [0x55] * 8)
    x_hat = ref.higgs_dequantize(codes, scales, grid, ref.random_signs(16, seed=0), 16)
    assert np.isfinite(x_hat).all() and (x_hat[0] == 0).all() and (x_hat[1, 16:] == 0).all()


def test_quantize_rejects_ragged_groups() -> None:
    with pytest.raises(ValueError, match="last dim 192 is not a multiple of group_size 128"):
        ref.higgs_quantize(np.ones((1, 192)), np.ones((4, 1)), ref.random_signs(128, 0), 128)


# ---- AQUA-KV reconstruction and quantize under given scales ------------------------------------


def test_grouped_prediction_is_a_block_diagonal_dense_map() -> None:
    rng = np.random.default_rng(0)
    g, c_in, c, r = 3, 12, 9, 2
    x = rng.normal(size=(2, 4, c_in))
    w, up, bias = rng.normal(size=(g, c_in // g, r)), rng.normal(size=(g, r, c // g)), rng.normal(size=c)
    dense = np.zeros((c_in, c))
    for k in range(g):  # block k: input slice k -> output slice k, through the rank-r factor
        dense[k * 4 : (k + 1) * 4, k * 3 : (k + 1) * 3] = w[k] @ up[k]
    np.testing.assert_allclose(ref.aqua_prediction([x], [w], up, bias), x @ dense + bias, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ref.aqua_prediction([], [], None, bias), bias)


def test_rope_is_a_rotation_of_the_half_pairs() -> None:
    rng = np.random.default_rng(1)
    x, theta = rng.normal(size=(5, 8)), rng.uniform(0, 6.3, size=(5, 4))
    cos, sin = np.cos(np.concatenate([theta, theta], -1)), np.sin(np.concatenate([theta, theta], -1))
    y = ref.rope(x, cos, sin)
    # pair (x_k, x_{k+4}) turns by theta_k as a complex number x_k + i x_{k+4}
    z = (x[:, :4] + 1j * x[:, 4:]) * np.exp(1j * theta)
    np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], -1), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ref.rope(x, np.ones_like(x), np.zeros_like(x)), x)


def test_quantize_scaled_at_the_norm_is_the_normalised_rotation() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 64)).astype(np.float16).astype(np.float64)
    signs = ref.random_signs(32, seed=3)
    y, s = ref.higgs.rotated_normalised(x, signs, 32)
    s16 = s.astype(np.float16)
    # given the fp16 norm, y differs from the unrounded-norm y only by the scale's rounding
    np.testing.assert_allclose(ref.higgs.rotated_scaled(x, s16, signs, 32), y * (s / s16.astype(np.float64))[..., None],
                               rtol=1e-12)
    assert (ref.higgs.rotated_scaled(x, np.zeros_like(s16), signs, 32) == 0).all()
