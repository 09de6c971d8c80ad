// higgs_linear on the host: y = x W^T with W given by its HIGGS codes, never materialised in full. Torch-free.
//
// Row j of W is groups of G values, each group g decoding to W[j, g] = s_jg/G * D * H grid[codes_jg]
// (H the unnormalised Hadamard matrix, symmetric; D the signs). So
//     y_j = sum_g s_jg/G * < H(D x_g), grid[codes_jg] >
// and the kernel rotates x once per group (xr = H D x, done by the launcher) and then only reads codes
// through the grid table, "in the code domain": w = grid[codes] is a short run of floats in L1, dotted with
// xr. Small batches (gemv_rows) do that per output row; prefill (code_domain_rows) writes whole rows of
// W' = s/G * grid[codes] for one matmul, skipping the per-row inverse rotation dequantize would need.
#pragma once

#include <cstdint>

#include "aquakv/bitpack.h"
#include "aquakv/half.h"

namespace aquakv {

struct LinearArgs {
  int64_t batch;        // rows of x
  int64_t in;           // groups * group_size
  int64_t groups;       // per row of W
  int64_t group_size;   // G
  int64_t d;            // grid dim
  int64_t group_bytes;  // G / d * code_bits / 8
  const uint8_t* codes;    // [out, groups * group_bytes]
  const uint16_t* scales;  // fp16 bits [out, groups]
  int64_t n;               // grid points
  const float* grid;       // [n, d]
  const float* grid_soa;   // n <= 64: component k's values at [k * 64, k * 64 + n), zero-padded; else unused
  bool soa;                // groups laid out component-major (n <= 64) or point by point (larger grids)
  const float* xr;         // rotated input, float32 [batch, in]
};

// Grid points of `count` codes in a group's component-major layout (grids of up to 64 points): w[k * stride + i] = grid[code[i] * d + k]
// (stride = G/d, the group's sub-vector count). xr is laid out the same way (the launcher de-interleaves it),
// so <xr_g, grid[codes]> is a plain dot product whatever d is, and grid lookups can run per component.
template <int D>
inline void gather_soa(const int32_t* __restrict code, int64_t count, int64_t stride, const float* __restrict grid,
                       float* __restrict w) {
  for (int64_t i = 0; i < count; ++i) {
    const float* p = grid + code[i] * D;
    for (int k = 0; k < D; ++k) w[k * stride + i] = p[k];
  }
}

// Point-major layout for large grids (w[i * d + k] = grid[code[i] * d + k]): one copy per point, which beats two
// scattered stores per point when the table cannot live in registers. Kept scalar: a vector gather instruction
// is slower than this loop on CPUs with the gather-data-sampling fix.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noinline, optimize("no-tree-vectorize")))
#endif
inline void gather_points_aos(const int32_t* code, int64_t count, int64_t d, const float* grid, float* w) {
  if (d == 2) {
    const uint64_t* g = reinterpret_cast<const uint64_t*>(grid);
    uint64_t* o = reinterpret_cast<uint64_t*>(w);
    for (int64_t i = 0; i < count; ++i) o[i] = g[code[i]];
  } else {
    for (int64_t i = 0; i < count; ++i)
      for (int64_t k = 0; k < d; ++k) w[i * d + k] = grid[code[i] * d + k];
  }
}

inline void gather_points_soa(const int32_t* code, int64_t count, int64_t stride, int64_t d, const float* grid,
                              float* w) {
  switch (d) {
    case 1: return gather_soa<1>(code, count, stride, grid, w);
    case 2: return gather_soa<2>(code, count, stride, grid, w);
    case 4: return gather_soa<4>(code, count, stride, grid, w);
    default:
      for (int64_t i = 0; i < count; ++i)
        for (int64_t k = 0; k < d; ++k) w[k * stride + i] = grid[code[i] * d + k];
  }
}

// sum_k a[k] * b[k] with 16 independent partial sums (n a multiple of 16: G >= 16 here, or a short tail),
// which the compiler keeps in one AVX-512 or two AVX2 registers; the partial sums are added as a tree.
inline float dot16(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[k + l] * b[k + l];
  for (int l = 0; k < n; ++k, ++l) acc[l] += a[k] * b[k];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// One group's grid points: unpack its codes (code_bits CB) and copy the points into w [G] in the group layout.
template <int CB>
inline void decode_group(const uint8_t* cp, int64_t m, int64_t d, bool soa, const float* grid, int32_t* code,
                         float* w) {
  unpack_row<CB>(cp, m, code);
  if (soa) {
    gather_points_soa(code, m, m, d, grid, w);
  } else {
    gather_points_aos(code, m, d, grid, w);
  }
}

// out_t[j * batch + b] = y_j of x row b for output rows j in [j0, j1) (out_t is y transposed, [out, batch]).
// Per group the points are decoded once and dotted with every row of xr; scratch: code [G/d], w [G].
template <int CB>
inline void gemv_rows(const LinearArgs& a, int64_t j0, int64_t j1, int32_t* code, float* w, float* acc,
                      float* out_t) {
  const int64_t G = a.group_size, m = G / a.d;
  const float inv_g = 1.f / static_cast<float>(G);
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t b = 0; b < a.batch; ++b) acc[b] = 0.f;
    const uint8_t* cp = a.codes + j * a.groups * a.group_bytes;
    const uint16_t* sp = a.scales + j * a.groups;
    for (int64_t g = 0; g < a.groups; ++g) {
      decode_group<CB>(cp + g * a.group_bytes, m, a.d, a.soa, a.grid, code, w);
      const float scale = half_bits_to_float(sp[g]) * inv_g;
      for (int64_t b = 0; b < a.batch; ++b) acc[b] += scale * dot16(w, a.xr + b * a.in + g * G, G);
    }
    for (int64_t b = 0; b < a.batch; ++b) out_t[j * a.batch + b] = acc[b];
  }
}

// W'[j - j0, :] = s_jg/G * grid[codes_jg] for rows j in [j0, j1): the code-domain weight, so x W^T = xr W'^T.
template <int CB>
inline void code_domain_rows(const LinearArgs& a, int64_t j0, int64_t j1, int32_t* code, float* w_out) {
  const int64_t G = a.group_size, m = G / a.d;
  const float inv_g = 1.f / static_cast<float>(G);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* cp = a.codes + j * a.groups * a.group_bytes;
    const uint16_t* sp = a.scales + j * a.groups;
    float* row = w_out + (j - j0) * a.in;
    for (int64_t g = 0; g < a.groups; ++g) {
      float* w = row + g * G;
      decode_group<CB>(cp + g * a.group_bytes, m, a.d, a.soa, a.grid, code, w);
      const float scale = half_bits_to_float(sp[g]) * inv_g;
      for (int64_t i = 0; i < G; ++i) w[i] *= scale;
    }
  }
}

}  // namespace aquakv
