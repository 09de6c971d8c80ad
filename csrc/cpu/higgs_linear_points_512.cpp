// higgs_linear's small-batch loop on AVX-512 for 4-, 6- and 8-bit codes (grids of 16, 64 and 256 points, d = 1, 2
// or 4), decoding whole grid points in xr's natural (point-major) order.
//
// A 256-point grid (2 KiB for d = 2) is too large for the register-permute lookups of the small grids, and a
// vector gather is slower than scalar loads on this CPU (4096x4096 (2,256), batch 1, one thread: 12.4 ms with
// vpgatherdq vs 2.8 ms here). So each zmm of grid points is built from 16/d masked broadcast loads, one per
// code, the codes shifted out of a 64-bit word in a register. That is about five instructions per code, and the
// points are never stored: the old path's 8-byte stores reloaded as one zmm miss store forwarding (4.4 ms on the
// same shape). The decoded zmm then feeds up to 16 rows of x from registers, so the decode is paid once per
// batch instead of once per row of x.
//
// Accumulation: acc_b += (s_jg/G * points) * xr_b, lane-wise over a block of columns (two partial sums for a
// single row of x), reduced into out_t per block. Every product sees one extra rounding (the scale), which the
// op's bound counts (docs/ops.md: the in + 2 of gamma).
#include <algorithm>
#include <vector>

#include "higgs_linear_cpu.h"
#include "higgs_linear_points.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AQUAKV_NO_TARGET_CLONES)
#include <immintrin.h>
#define AQUAKV_POINTS_512 1
#define AQUAKV_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define AQUAKV_INLINE inline __attribute__((always_inline))
#endif

namespace aquakv::cpu {

#ifdef AQUAKV_POINTS_512
namespace {

using namespace points;

// Lane group l of v (d floats) = grid point code; the masked broadcast loads exactly that point's d floats.
template <int D>
AQUAKV_AVX512 AQUAKV_INLINE __m512 put_point(__m512 v, int l, const float* grid, uint32_t code) {
  const float* p = grid + code * D;
  if constexpr (D == 1) {
    return _mm512_mask_broadcastss_ps(v, static_cast<__mmask16>(1u << l), _mm_load_ss(p));
  } else if constexpr (D == 2) {
    const __m512d vd = _mm512_mask_broadcastsd_pd(_mm512_castps_pd(v), static_cast<__mmask8>(1u << l),
                                                  _mm_load_sd(reinterpret_cast<const double*>(p)));
    return _mm512_castpd_ps(vd);
  } else {
    return _mm512_mask_broadcast_f32x4(v, static_cast<__mmask16>(0xfu << (4 * l)), _mm_loadu_ps(p));
  }
}

// The 16 floats of 16/D consecutive codes of CB bits (cp: their first byte; 16/D codes fill whole bytes), in the
// group's point-major order. The codes come out of one 64-bit word per 8 codes (the LSB-first bitstream of
// aquakv/bitpack.h), shifted in a register.
template <int D, int CB>
AQUAKV_AVX512 AQUAKV_INLINE __m512 points16(const float* grid, const uint8_t* cp) {
  constexpr int kCodes = 16 / D, kPerWord = kCodes < 8 ? kCodes : 8;
  constexpr uint64_t kMask = (uint64_t{1} << CB) - 1;
  __m512 v = _mm512_setzero_ps();
  for (int w = 0; w < kCodes / kPerWord; ++w) {
    const uint64_t bits = load_le<kPerWord * CB / 8>(cp + w * kPerWord * CB / 8);
#pragma GCC unroll 8
    for (int l = 0; l < kPerWord; ++l)
      v = put_point<D>(v, w * kPerWord + l, grid, static_cast<uint32_t>((bits >> (CB * l)) & kMask));
  }
  return v;
}

// Fewer than 16 floats in a group (G < 16): its `floats` values, the other lanes zero.
template <int D, int CB>
AQUAKV_AVX512 inline __m512 points_partial(const float* grid, const uint8_t* cp, int64_t floats) {
  int32_t code[16];
  unpack_row<CB>(cp, floats / D, code);
  __m512 v = _mm512_setzero_ps();
  for (int64_t l = 0; l < floats / D; ++l) v = put_point<D>(v, static_cast<int>(l), grid, code[l]);
  return v;
}

// acc[b] += (s/G * grid[codes]) . xr_b over the groups [g0, g1) of output row j, for the NB rows of x in xt.
template <int D, int CB, int NB>
AQUAKV_AVX512 AQUAKV_INLINE void row_block(const LinearArgs& a, int64_t j, int64_t g0, int64_t g1, const XrTile& xt,
                                           __m512* acc) {
  const int64_t G = a.group_size;
  const float inv_g = 1.f / static_cast<float>(G);
  const uint8_t* cp = a.codes + j * a.groups * a.group_bytes;
  const uint16_t* sp = a.scales + j * a.groups;
  for (int64_t g = g0; g < g1; ++g) {
    const __m512 scale = _mm512_set1_ps(half_bits_to_float(sp[g]) * inv_g);
    const uint8_t* cg = cp + g * a.group_bytes;
    if (G < 16) {  // G divides 16, so the group lies inside one chunk
      const __m512 w = _mm512_mul_ps(scale, points_partial<D, CB>(a.grid, cg, G));
      const __mmask16 tail = static_cast<__mmask16>((1u << G) - 1u);
      for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(tail, xt.at(b, g * G)), acc[b]);
      continue;
    }
    if constexpr (NB == 1) {  // two sums, so that FMA latency never binds; the scale once per group
      __m512 s0 = _mm512_setzero_ps(), s1 = s0;
      int64_t k = 0;
      for (; k + 32 <= G; k += 32) {
        const __m512 w0 = points16<D, CB>(a.grid, cg + k / D * CB / 8);
        const __m512 w1 = points16<D, CB>(a.grid, cg + (k + 16) / D * CB / 8);
        s0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt.at(0, g * G + k)), s0);
        s1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt.at(0, g * G + k + 16)), s1);
      }
      if (k < G) {  // G = 16
        const __m512 w0 = points16<D, CB>(a.grid, cg + k / D * CB / 8);
        s0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt.at(0, g * G + k)), s0);
      }
      acc[0] = _mm512_fmadd_ps(scale, _mm512_add_ps(s0, s1), acc[0]);
    } else if constexpr (NB <= 8) {  // group sums in registers beside the row sums; the scale once per group
      __m512 sum[NB];
      for (int b = 0; b < NB; ++b) sum[b] = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) {
        const __m512 w = points16<D, CB>(a.grid, cg + k / D * CB / 8);
        const float* xk = xt.at(0, g * G + k);
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) sum[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + b * xt.row), sum[b]);
      }
      for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(scale, sum[b], acc[b]);
    } else {  // 16 rows of x fill the registers: the scale goes on the points
      for (int64_t k = 0; k < G; k += 16) {
        const __m512 w = _mm512_mul_ps(scale, points16<D, CB>(a.grid, cg + k / D * CB / 8));
        const float* xk = xt.at(0, g * G + k);
#pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + b * xt.row), acc[b]);
      }
    }
  }
}

template <int D, int CB, int NB>
AQUAKV_AVX512 void rows_points(const LinearArgs& a, int64_t j0, int64_t j1, int64_t b0, float* out_t) {
  const int64_t G = a.group_size;
  const int64_t block_groups = std::max<int64_t>(1, kXrBlockFloats / NB / G);
  std::vector<float> interleaved;
  const XrTile xt = xr_tile(a.xr, a.in, b0, NB, interleaved);
  for (int64_t t0 = j0; t0 < j1; t0 += kRowTile) {
    const int64_t t1 = std::min(j1, t0 + kRowTile);
    for (int64_t g0 = 0; g0 < a.groups; g0 += block_groups) {
      const int64_t g1 = std::min(a.groups, g0 + block_groups);
      for (int64_t j = t0; j < t1; ++j) {
        __m512 acc[NB];
        for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
        row_block<D, CB, NB>(a, j, g0, g1, xt, acc);
        float* o = out_t + j * a.batch + b0;
        for (int b = 0; b < NB; ++b) o[b] = (g0 == 0 ? 0.f : o[b]) + _mm512_reduce_add_ps(acc[b]);
      }
    }
  }
}

// Rows of x in register tiles of 16, 8, 4, 2, 1: each tile decodes the codes once.
template <int D, int CB>
AQUAKV_AVX512 void rows_points_tiled(const LinearArgs& a, int64_t j0, int64_t j1, float* out_t) {
  int64_t b = 0;
  for (; b + 16 <= a.batch; b += 16) rows_points<D, CB, 16>(a, j0, j1, b, out_t);
  if (b + 8 <= a.batch) rows_points<D, CB, 8>(a, j0, j1, b, out_t), b += 8;
  if (b + 4 <= a.batch) rows_points<D, CB, 4>(a, j0, j1, b, out_t), b += 4;
  if (b + 2 <= a.batch) rows_points<D, CB, 2>(a, j0, j1, b, out_t), b += 2;
  if (b < a.batch) rows_points<D, CB, 1>(a, j0, j1, b, out_t);
}

}  // namespace

bool higgs_gemv_rows_points_512(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, float* out_t) {
  if (a.soa || (a.d != 1 && a.d != 2 && a.d != 4) || (code_bits != 4 && code_bits != 6 && code_bits != 8)) return false;
  AQUAKV_DISPATCH_POINTS(a.d, code_bits, [&] { rows_points_tiled<D, CB>(a, j0, j1, out_t); });
  return true;
}

#else

bool higgs_gemv_rows_points_512(const LinearArgs&, int, int64_t, int64_t, float*) { return false; }

#endif

}  // namespace aquakv::cpu
