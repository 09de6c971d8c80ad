// higgs_linear's small-batch loop on AVX2 + FMA for 4-, 6- and 8-bit codes (grids of 16, 64 and 256 points, d = 1,
// 2 or 4): the AVX-512 point loop (higgs_linear_points_512.cpp) in 8-lane registers.
//
// Without masked broadcasts, each ymm of grid points is put together from plain loads: d = 4, two 16-byte points
// (a load and an insert); d = 2, four 8-byte points (two movsd/movhpd pairs and an insert); d = 1, eight floats.
// As on AVX-512 the points are never stored and reloaded (an 8-byte store read back as part of a vector misses
// store forwarding). On one AMD EPYC (Zen 3) thread, 4096x4096 (2,256) at batch 1: 2.9 ms, against 8.4 ms for the
// general loop this replaces (copy the points into L1, then dot); two vpgatherdq per 16 floats took 5.7 ms.
//
// Rows of x go in register tiles of 8, 4, 2 and 1: 16 ymm registers hold 8 row sums beside the points. A single
// row keeps two sums (the two halves of each 16-float chunk) and scales once per group; tiles of several rows
// scale the points instead, so each row needs one register. Every product sees one extra rounding (the scale),
// which the op's bound counts (docs/ops.md: the in + 2 of gamma).
#include <algorithm>
#include <vector>

#include "higgs_linear_cpu.h"
#include "higgs_linear_points.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AQUAKV_NO_TARGET_CLONES)
#include <immintrin.h>
#define AQUAKV_POINTS_256 1
#define AQUAKV_AVX2 __attribute__((target("avx2,fma")))
#define AQUAKV_INLINE inline __attribute__((always_inline))
#endif

namespace aquakv::cpu {

#ifdef AQUAKV_POINTS_256
namespace {

using namespace points;

struct Points16 {
  __m256 lo, hi;  // floats 0-7 and 8-15
};

AQUAKV_AVX2 AQUAKV_INLINE __m128 two_points_d2(const float* grid, uint32_t c0, uint32_t c1) {
  const __m128d v = _mm_load_sd(reinterpret_cast<const double*>(grid + 2 * c0));
  return _mm_castpd_ps(_mm_loadh_pd(v, reinterpret_cast<const double*>(grid + 2 * c1)));
}

// 8 floats from 8 / D points, point-major.
template <int D>
AQUAKV_AVX2 AQUAKV_INLINE __m256 points8(const float* grid, const uint32_t* c) {
  if constexpr (D == 4) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(grid + 4 * c[0])), _mm_loadu_ps(grid + 4 * c[1]),
                                1);
  } else if constexpr (D == 2) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(two_points_d2(grid, c[0], c[1])),
                                two_points_d2(grid, c[2], c[3]), 1);
  } else {
    return _mm256_setr_ps(grid[c[0]], grid[c[1]], grid[c[2]], grid[c[3]], grid[c[4]], grid[c[5]], grid[c[6]],
                          grid[c[7]]);
  }
}

// The 16 floats of 16/D consecutive codes of CB bits (cp: their first byte).
template <int D, int CB>
AQUAKV_AVX2 AQUAKV_INLINE Points16 points16(const float* grid, const uint8_t* cp) {
  uint32_t code[16 / D];
  codes16<D, CB>(cp, code);
  return {points8<D>(grid, code), points8<D>(grid, code + 8 / D)};
}

AQUAKV_AVX2 AQUAKV_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lanes [0, count) of 8 set, for maskload: a group of fewer than 16 floats.
AQUAKV_AVX2 AQUAKV_INLINE __m256i first_lanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// acc[b] += (s/G * grid[codes]) . xr_b over the groups [g0, g1) of output row j, for the NB rows of x in xt.
template <int D, int CB, int NB>
AQUAKV_AVX2 AQUAKV_INLINE void row_block(const LinearArgs& a, int64_t j, int64_t g0, int64_t g1, const XrTile& xt,
                                         __m256* acc) {
  const int64_t G = a.group_size;
  const float inv_g = 1.f / static_cast<float>(G);
  const uint8_t* cp = a.codes + j * a.groups * a.group_bytes;
  const uint16_t* sp = a.scales + j * a.groups;
  for (int64_t g = g0; g < g1; ++g) {
    const float s = half_bits_to_float(sp[g]) * inv_g;
    const __m256 scale = _mm256_set1_ps(s);
    const uint8_t* cg = cp + g * a.group_bytes;
    if (G < 16) {  // G divides 16 (so G <= 8): the group lies inside one chunk; its points through a buffer
      alignas(32) float w[8] = {};
      int32_t code[8];
      unpack_row<CB>(cg, G / D, code);
      for (int64_t i = 0; i < G / D; ++i)
        for (int k = 0; k < D; ++k) w[i * D + k] = s * a.grid[code[i] * D + k];
      const __m256i lanes = first_lanes(G);
      for (int b = 0; b < NB; ++b)
        acc[b] = _mm256_fmadd_ps(_mm256_load_ps(w), _mm256_maskload_ps(xt.at(b, g * G), lanes), acc[b]);
      continue;
    }
    if constexpr (NB == 1) {
      __m256 s0 = _mm256_setzero_ps(), s1 = s0;
      for (int64_t k = 0; k < G; k += 16) {
        const Points16 w = points16<D, CB>(a.grid, cg + k / D * CB / 8);
        const float* x = xt.at(0, g * G + k);
        s0 = _mm256_fmadd_ps(w.lo, _mm256_loadu_ps(x), s0);
        s1 = _mm256_fmadd_ps(w.hi, _mm256_loadu_ps(x + 8), s1);
      }
      acc[0] = _mm256_fmadd_ps(scale, _mm256_add_ps(s0, s1), acc[0]);
    } else {
      for (int64_t k = 0; k < G; k += 16) {
        const Points16 p = points16<D, CB>(a.grid, cg + k / D * CB / 8);
        const __m256 lo = _mm256_mul_ps(scale, p.lo), hi = _mm256_mul_ps(scale, p.hi);
        const float* xk = xt.at(0, g * G + k);
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) {
          acc[b] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xk + b * xt.row), acc[b]);
          acc[b] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xk + b * xt.row + 8), acc[b]);
        }
      }
    }
  }
}

template <int D, int CB, int NB>
AQUAKV_AVX2 void rows_points(const LinearArgs& a, int64_t j0, int64_t j1, int64_t b0, float* out_t) {
  const int64_t block_groups = std::max<int64_t>(1, kXrBlockFloats / NB / a.group_size);
  std::vector<float> interleaved;
  const XrTile xt = xr_tile(a.xr, a.in, b0, NB, interleaved);
  for (int64_t t0 = j0; t0 < j1; t0 += kRowTile) {
    const int64_t t1 = std::min(j1, t0 + kRowTile);
    for (int64_t g0 = 0; g0 < a.groups; g0 += block_groups) {
      const int64_t g1 = std::min(a.groups, g0 + block_groups);
      for (int64_t j = t0; j < t1; ++j) {
        __m256 acc[NB];
        for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
        row_block<D, CB, NB>(a, j, g0, g1, xt, acc);
        float* o = out_t + j * a.batch + b0;
        for (int b = 0; b < NB; ++b) o[b] = (g0 == 0 ? 0.f : o[b]) + hsum(acc[b]);
      }
    }
  }
}

template <int D, int CB>
AQUAKV_AVX2 void rows_points_tiled(const LinearArgs& a, int64_t j0, int64_t j1, float* out_t) {
  int64_t b = 0;
  for (; b + 8 <= a.batch; b += 8) rows_points<D, CB, 8>(a, j0, j1, b, out_t);
  if (b + 4 <= a.batch) rows_points<D, CB, 4>(a, j0, j1, b, out_t), b += 4;
  if (b + 2 <= a.batch) rows_points<D, CB, 2>(a, j0, j1, b, out_t), b += 2;
  if (b < a.batch) rows_points<D, CB, 1>(a, j0, j1, b, out_t);
}

}  // namespace

bool higgs_gemv_rows_points_256(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, float* out_t) {
  if (a.soa || (a.d != 1 && a.d != 2 && a.d != 4) || (code_bits != 4 && code_bits != 6 && code_bits != 8)) return false;
  AQUAKV_DISPATCH_POINTS(a.d, code_bits, [&] { rows_points_tiled<D, CB>(a, j0, j1, out_t); });
  return true;
}

#else

bool higgs_gemv_rows_points_256(const LinearArgs&, int, int64_t, int64_t, float*) { return false; }

#endif

}  // namespace aquakv::cpu
