// Helpers shared by the CPU kernels (torch-using; kernels proper live in csrc/include/aquakv/).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "aquakv/half.h"

// Runs __VA_ARGS__ with scalar_t bound to float, at::Half or at::BFloat16 (the float types the ops accept).
#define AQUAKV_DISPATCH_FLOAT(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Hot loops are compiled twice, for AVX2 and for the baseline, and picked when the library loads
// (GCC/Clang ifunc), so one portable build still runs the wide loops where the CPU has them
// (measured: nearest-point search 1.5 -> 5.0 G evaluations/s per core). No FMA is enabled, so both
// clones round identically and results do not depend on the machine.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AQUAKV_NO_TARGET_CLONES)
#define AQUAKV_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AQUAKV_TARGET_CLONES
#endif

namespace aquakv::cpu {

// In-place unnormalised Walsh-Hadamard transform of n floats (aquakv/hadamard.h), cloned per ISA.
void fwht_f32(float* x, int64_t n);

// Nearest grid point of m sub-vectors in SoA layout (aquakv/grid.h, nearest_soa_any), cloned per ISA.
void nearest_f32(const float* y, int64_t m, const float* grid, const float* half_norm, int64_t n, int64_t d,
                 float* best, int32_t* code);

// at::parallel_for grain (minimum items per task) so that each task handles about `target` values.
inline int64_t grain_for(int64_t values_per_item, int64_t target = 1 << 15) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, values_per_item));
}

// Sum of squares with 8 independent partial sums: vectorises without -ffast-math and loses less
// precision than one running sum (error grows like log(n) instead of n).
inline float sum_squares(const float* __restrict v, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += v[i + k] * v[i + k];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += v[i] * v[i];
  return s;
}

// aqua_reconstruct's float32 epilogue for one row (b, t), cloned per ISA; see aqua_cpu.cpp for the operations.
// code: the row's unpacked codes, groups * (G / d) of them; group_scale[g] = s_g / G. pred (null without
// inputs) points at the row's first predictor column; its pred_groups column blocks of pred_cols sit
// pred_group_stride floats apart. cos/sin: the row's D angles (null: no RoPE). Writes hat [C] and the
// rotated row [C] (heads of D, or a copy of hat without RoPE).
// pair_table (optional, d = 2 grids and group_size >= 8 only): from fwht8_pair_table, turns the grid lookup
// and the FWHT's first three stages into four table rows and three vector adds per 8 values.
struct AquaRowArgs {
  int64_t groups, group_size, d, n, pred_groups, pred_cols, pred_group_stride, heads, head_dim;
  const float *grid, *signs, *bias, *pair_table;
};

// For a d = 2 grid of n points: table[(j * n + c) * 8 + p] = H8[p][2j] * grid[c][0] + H8[p][2j+1] * grid[c][1],
// the contribution of code c in pair slot j (values 2j, 2j+1 of a block of 8) to the block's first three
// FWHT stages (4 * n * 8 floats). Each entry is a value of the butterfly's first stage, +-(g0 +- g1), so
// (T0 + T1) + (T2 + T3) repeats the radix-8 step's own sums in its own order: the same float32 result.
void fwht8_pair_table(const float* grid, int64_t n, float* table);
void aqua_row_f32(const AquaRowArgs& a, const int32_t* code, const float* group_scale, const float* pred,
                  const float* cos, const float* sin, float* hat, float* rotated);

// Row I/O between a tensor's dtype and float32 math:
//   load_row:  out[i] = float(x[i]) * signs[i]            (signs may be null: no sign flip)
//   store_row: out[i] = T(scale * signs[i] * y[i])       (signs may be null)
// float and bfloat16 conversions vectorise as written; fp16 goes through the ISA-cloned loops over
// aquakv/half.h (c10::Half's conversions keep a branch and do not vectorise).
void load_row_f16(const uint16_t* x, const float* signs, float* out, int64_t n);
void store_row_f16(const float* y, float scale, const float* signs, uint16_t* out, int64_t n);

template <typename T>
inline void load_row(const T* __restrict x, const float* __restrict signs, float* __restrict out, int64_t n) {
  if (signs) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]) * signs[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
  }
}

template <typename T>
inline void store_row(const float* __restrict y, float scale, const float* __restrict signs, T* __restrict out,
                      int64_t n) {
  if (signs) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(scale * signs[i] * y[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(scale * y[i]);
  }
}

// c10::Half is a standard-layout wrapper of its uint16_t bits.
template <>
inline void load_row<at::Half>(const at::Half* x, const float* signs, float* out, int64_t n) {
  load_row_f16(reinterpret_cast<const uint16_t*>(x), signs, out, n);
}

template <>
inline void store_row<at::Half>(const float* y, float scale, const float* signs, at::Half* out, int64_t n) {
  store_row_f16(y, scale, signs, reinterpret_cast<uint16_t*>(out), n);
}

}  // namespace aquakv::cpu
