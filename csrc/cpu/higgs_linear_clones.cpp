// higgs_linear's hot loops per instruction set, picked at run time: AVX-512 (16-lane gathers of grid
// points, 16-wide multiply-adds), AVX2 + FMA (8-lane), or the portable loops of aquakv/higgs_linear.h.
// The environment variable AQUAKV_HIGGS_LINEAR_ISA = avx512 | avx2 | baseline caps the choice (tests run every
// path on one machine; benchmarks compare them). The paths sum in different orders and the vector ones fuse
// multiply-adds, so they differ in the last bits; the op's accuracy bound holds for any order (docs/ops.md).
#include <cstdlib>
#include <cstring>

#include "aquakv/dispatch.h"
#include "aquakv/higgs_linear.h"
#include "higgs_linear_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AQUAKV_NO_TARGET_CLONES)
#include <immintrin.h>
#define AQUAKV_X86 1
#define AQUAKV_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define AQUAKV_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__GNUC__) || defined(__clang__)
#define AQUAKV_INLINE inline __attribute__((always_inline))
#else
#define AQUAKV_INLINE inline
#endif

namespace aquakv::cpu {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa pick_isa() {
  Isa best = Isa::kBaseline;
#ifdef AQUAKV_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && best == Isa::kAvx2) best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("AQUAKV_HIGGS_LINEAR_ISA");
  if (cap && std::strcmp(cap, "baseline") == 0) return Isa::kBaseline;
  if (cap && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
}

// Codes of one group as int32: byte-wide and nibble-wide codes vectorise below; other widths go bit-serial.
template <int CB>
inline void unpack_codes(const uint8_t* cp, int64_t m, int32_t* code) {
  unpack_row<CB>(cp, m, code);
}

#ifdef AQUAKV_X86
// ---- AVX-512 ---------------------------------------------------------------------------------------------------
AQUAKV_AVX512 AQUAKV_INLINE void unpack_512(int cb, const uint8_t* cp, int64_t m, int32_t* code) {
  int64_t i = 0;
  if (cb == 8) {
    for (; i + 16 <= m; i += 16)
      _mm512_storeu_si512(code + i, _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + i))));
    for (; i < m; ++i) code[i] = cp[i];
  } else if (cb == 4) {
    const __m128i low = _mm_set1_epi8(0x0f);
    for (; i + 16 <= m; i += 16) {  // 8 bytes -> 16 codes, low nibble first
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + i / 2));
      const __m128i codes8 = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
      _mm512_storeu_si512(code + i, _mm512_cvtepu8_epi32(codes8));
    }
    if (i < m) unpack_row<4>(cp + i / 2, m - i, code + i);
  } else {
    AQUAKV_DISPATCH_BITS(cb, CB, [&] { unpack_codes<CB>(cp, m, code); });
  }
}

// w in the group's layout, xr's: grids of up to 64 points component-major (w[k*m + i] = grid[code_i][k]), looked
// up 16 codes at a time in registers (a gather instruction is slow on CPUs with the gather-data-sampling fix);
// larger ones point-major, copied point by point from L1.
AQUAKV_AVX512 AQUAKV_INLINE void gather_512(const int32_t* code, int64_t m, int64_t d, int64_t n, const float* grid_soa,
                              const float* grid, float* w) {
  int64_t i = 0;
  if (n <= 64) {  // grid_soa: component k's n values at grid_soa[k * 64], zero-padded to 64
    for (int64_t k = 0; k < d; ++k) {
      const float* t = grid_soa + k * 64;
      const __m512 t0 = _mm512_loadu_ps(t), t1 = _mm512_loadu_ps(t + 16), t2 = _mm512_loadu_ps(t + 32),
                   t3 = _mm512_loadu_ps(t + 48);
      for (i = 0; i + 16 <= m; i += 16) {
        const __m512i idx = _mm512_loadu_si512(code + i);
        __m512 v;
        if (n <= 16) {
          v = _mm512_permutexvar_ps(idx, t0);
        } else {
          const __m512 lo = _mm512_permutex2var_ps(t0, idx, t1), hi = _mm512_permutex2var_ps(t2, idx, t3);
          v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
        }
        _mm512_storeu_ps(w + k * m + i, v);
      }
    }
    if (i < m) gather_points_soa(code + i, m - i, m, d, grid, w + i);
  } else {
    gather_points_aos(code, m, d, grid, w);
  }
}

// accv[b*16 .. +16) += scale * (lane sums of w * xr_b) over G values for nb rows of xr (row stride `stride`);
// four rows share each load of w, and the lanes are reduced once per output row (finish_512), not per group.
AQUAKV_AVX512 AQUAKV_INLINE void dots_512(const float* w, const float* xr, int64_t stride, int64_t nb, int64_t G,
                                          float scale, float* accv) {
  const __m512 sv = _mm512_set1_ps(scale);
  if (G % 16) {  // G < 16: one partial vector of G lanes
    const __mmask16 mask = static_cast<__mmask16>((1u << G) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w);
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 p = _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(mask, xr + b * stride));
      _mm512_storeu_ps(accv + 16 * b, _mm512_fmadd_ps(sv, p, _mm512_loadu_ps(accv + 16 * b)));
    }
    return;
  }
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    const float *x0 = xr + b * stride, *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < G; k += 16) {
      const __m512 wv = _mm512_loadu_ps(w + k);
      a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + k), a0);
      a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x1 + k), a1);
      a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x2 + k), a2);
      a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x3 + k), a3);
    }
    float* o = accv + 16 * b;
    _mm512_storeu_ps(o, _mm512_fmadd_ps(sv, a0, _mm512_loadu_ps(o)));
    _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(sv, a1, _mm512_loadu_ps(o + 16)));
    _mm512_storeu_ps(o + 32, _mm512_fmadd_ps(sv, a2, _mm512_loadu_ps(o + 32)));
    _mm512_storeu_ps(o + 48, _mm512_fmadd_ps(sv, a3, _mm512_loadu_ps(o + 48)));
  }
  for (; b < nb; ++b) {
    const float* x0 = xr + b * stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= G; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x0 + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x0 + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x0 + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x0 + k + 48), a3);
    }
    for (; k < G; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x0 + k), a0);
    float* o = accv + 16 * b;
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    _mm512_storeu_ps(o, _mm512_fmadd_ps(sv, sum, _mm512_loadu_ps(o)));
  }
}

AQUAKV_AVX512 AQUAKV_INLINE float finish_512(const float* accv) { return _mm512_reduce_add_ps(_mm512_loadu_ps(accv)); }

// ---- AVX2 + FMA ------------------------------------------------------------------------------------------------
AQUAKV_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

AQUAKV_AVX2 AQUAKV_INLINE void unpack_256(int cb, const uint8_t* cp, int64_t m, int32_t* code) {
  int64_t i = 0;
  if (cb == 8) {
    for (; i + 8 <= m; i += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(code + i),
                          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + i))));
    for (; i < m; ++i) code[i] = cp[i];
  } else if (cb == 4) {
    const __m128i low = _mm_set1_epi8(0x0f);
    for (; i + 16 <= m; i += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + i / 2));
      const __m128i codes8 = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(code + i), _mm256_cvtepu8_epi32(codes8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(code + i + 8), _mm256_cvtepu8_epi32(_mm_srli_si128(codes8, 8)));
    }
    if (i < m) unpack_row<4>(cp + i / 2, m - i, code + i);
  } else {
    AQUAKV_DISPATCH_BITS(cb, CB, [&] { unpack_codes<CB>(cp, m, code); });
  }
}

AQUAKV_AVX2 AQUAKV_INLINE void gather_256(const int32_t* code, int64_t m, int64_t d, int64_t n, const float* grid_soa,
                            const float* grid, float* w) {
  int64_t i = 0;
  if (n > 64) return gather_points_aos(code, m, d, grid, w);
  if (n <= 8) {  // one register per component
    for (int64_t k = 0; k < d; ++k) {
      const __m256 t = _mm256_loadu_ps(grid_soa + k * 64);
      for (i = 0; i + 8 <= m; i += 8)
        _mm256_storeu_ps(w + k * m + i,
                         _mm256_permutevar8x32_ps(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code + i))));
    }
  }
  if (i < m) gather_points_soa(code + i, m - i, m, d, grid, w + i);
}

// As dots_512 with 8 lanes per row (accv[b*8 .. +8)); two rows share each load of w.
AQUAKV_AVX2 AQUAKV_INLINE void dots_256(const float* w, const float* xr, int64_t stride, int64_t nb, int64_t G,
                                        float scale, float* accv) {
  if (G % 16) {
    for (int64_t b = 0; b < nb; ++b) accv[8 * b] += scale * dot16(w, xr + b * stride, G);
    return;
  }
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const float *x0 = xr + b * stride, *x1 = x0 + stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, c0 = a0, c1 = a0;
    for (int64_t k = 0; k < G; k += 16) {
      const __m256 wa = _mm256_loadu_ps(w + k), wb = _mm256_loadu_ps(w + k + 8);
      a0 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x0 + k), a0);
      c0 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x0 + k + 8), c0);
      a1 = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x1 + k), a1);
      c1 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x1 + k + 8), c1);
    }
    float* o = accv + 8 * b;
    _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, _mm256_add_ps(a0, c0), _mm256_loadu_ps(o)));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(sv, _mm256_add_ps(a1, c1), _mm256_loadu_ps(o + 8)));
  }
  for (; b < nb; ++b) {
    const float* x0 = xr + b * stride;
    __m256 a0 = _mm256_setzero_ps(), c0 = a0;
    for (int64_t k = 0; k < G; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x0 + k), a0);
      c0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x0 + k + 8), c0);
    }
    float* o = accv + 8 * b;
    _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, _mm256_add_ps(a0, c0), _mm256_loadu_ps(o)));
  }
}

AQUAKV_AVX2 AQUAKV_INLINE float finish_256(const float* accv) { return hsum256(_mm256_loadu_ps(accv)); }

#endif  // AQUAKV_X86

// The shared row loops over one ISA's pieces (unpack, gather, dots, finish), inlined into a wrapper compiled for
// that ISA so the pieces inline too. accv: `lanes` float32 partial sums per row of x.
template <int Lanes, class Unpack, class Gather, class Dots, class Finish>
AQUAKV_INLINE void gemv_rows_with(const LinearArgs& a, int cb, int64_t j0, int64_t j1, int32_t* code, float* w,
                                  float* accv, float* out_t, Unpack unpack, Gather gather, Dots dots, Finish finish) {
  const int64_t G = a.group_size, m = G / a.d;
  const float inv_g = 1.f / static_cast<float>(G);
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t i = 0; i < a.batch * Lanes; ++i) accv[i] = 0.f;
    const uint8_t* cp = a.codes + j * a.groups * a.group_bytes;
    const uint16_t* sp = a.scales + j * a.groups;
    for (int64_t g = 0; g < a.groups; ++g) {
      unpack(cb, cp + g * a.group_bytes, m, code);
      gather(code, m, a.d, a.n, a.grid_soa, a.grid, w);
      dots(w, a.xr + g * G, a.in, a.batch, G, half_bits_to_float(sp[g]) * inv_g, accv);
    }
    for (int64_t b = 0; b < a.batch; ++b) out_t[j * a.batch + b] = finish(accv + b * Lanes);
  }
}

template <class Unpack, class Gather>
AQUAKV_INLINE void code_domain_rows_with(const LinearArgs& a, int cb, int64_t j0, int64_t j1, int32_t* code,
                                         float* w_out, Unpack unpack, Gather gather) {
  const int64_t G = a.group_size, m = G / a.d;
  const float inv_g = 1.f / static_cast<float>(G);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* cp = a.codes + j * a.groups * a.group_bytes;
    const uint16_t* sp = a.scales + j * a.groups;
    float* row = w_out + (j - j0) * a.in;
    for (int64_t g = 0; g < a.groups; ++g) {
      float* __restrict w = row + g * G;
      unpack(cb, cp + g * a.group_bytes, m, code);
      gather(code, m, a.d, a.n, a.grid_soa, a.grid, w);
      const float scale = half_bits_to_float(sp[g]) * inv_g;
      for (int64_t i = 0; i < G; ++i) w[i] *= scale;
    }
  }
}

#ifdef AQUAKV_X86
AQUAKV_AVX512 void gemv_512(const LinearArgs& a, int cb, int64_t j0, int64_t j1, int32_t* code, float* w, float* accv,
                            float* out_t) {
  gemv_rows_with<16>(a, cb, j0, j1, code, w, accv, out_t, unpack_512, gather_512, dots_512, finish_512);
}
AQUAKV_AVX2 void gemv_256(const LinearArgs& a, int cb, int64_t j0, int64_t j1, int32_t* code, float* w, float* accv,
                          float* out_t) {
  gemv_rows_with<8>(a, cb, j0, j1, code, w, accv, out_t, unpack_256, gather_256, dots_256, finish_256);
}
AQUAKV_AVX512 void code_domain_512(const LinearArgs& a, int cb, int64_t j0, int64_t j1, int32_t* code, float* w_out) {
  code_domain_rows_with(a, cb, j0, j1, code, w_out, unpack_512, gather_512);
}
AQUAKV_AVX2 void code_domain_256(const LinearArgs& a, int cb, int64_t j0, int64_t j1, int32_t* code, float* w_out) {
  code_domain_rows_with(a, cb, j0, j1, code, w_out, unpack_256, gather_256);
}
#endif

}  // namespace

void higgs_gemv_rows(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, int32_t* code, float* w, float* acc,
                     float* out_t) {
  switch (pick_isa()) {
#ifdef AQUAKV_X86
    case Isa::kAvx512:
      if (higgs_gemv_rows_points_512(a, code_bits, j0, j1, out_t)) return;
      return gemv_512(a, code_bits, j0, j1, code, w, acc, out_t);
    case Isa::kAvx2:
      if (higgs_points_serve(code_bits, a.d, a.batch) && higgs_gemv_rows_points_256(a, code_bits, j0, j1, out_t))
        return;
      return gemv_256(a, code_bits, j0, j1, code, w, acc, out_t);
#endif
    default: AQUAKV_DISPATCH_BITS(code_bits, CB, [&] { gemv_rows<CB>(a, j0, j1, code, w, acc, out_t); });
  }
}

// AVX-512: 64- and 256-point grids always; 16-point grids from two rows of x on, where decoding once for all rows
// beats their register permutes (4096x4096 (2,16), thread time: batch 1 3.3 vs 3.7 ms, batch 4 5.4 vs 4.3, 16
// 13.6 vs 10.6 ms, the point loop second). AVX2: every batch, 16-point grids included: there only grids of up to 8
// points fit the register permutes, and the point loop beat or matched the copy-then-dot loop on every shape and
// batch of bench_higgs_linear (4096x4096 (2,256), batch 1: 2.9 vs 8.4 ms, one Zen 3 thread).
bool higgs_points_serve(int code_bits, int64_t d, int64_t batch) {
#ifdef AQUAKV_X86
  if (d != 1 && d != 2 && d != 4) return false;
  if (code_bits != 8 && code_bits != 6 && code_bits != 4) return false;
  switch (pick_isa()) {
    case Isa::kAvx512: return code_bits != 4 || batch >= 2;
    case Isa::kAvx2: return true;
    default: return false;
  }
#else
  (void)code_bits, (void)d, (void)batch;
  return false;
#endif
}

void higgs_code_domain_rows(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, int32_t* code, float* w_out) {
  switch (pick_isa()) {
#ifdef AQUAKV_X86
    case Isa::kAvx512: return code_domain_512(a, code_bits, j0, j1, code, w_out);
    case Isa::kAvx2: return code_domain_256(a, code_bits, j0, j1, code, w_out);
#endif
    default: AQUAKV_DISPATCH_BITS(code_bits, CB, [&] { code_domain_rows<CB>(a, j0, j1, code, w_out); });
  }
}

}  // namespace aquakv::cpu
