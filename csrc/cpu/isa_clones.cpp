// The torch-free hot loops, instantiated once per instruction set (see AQUAKV_TARGET_CLONES).
#include "aquakv/grid.h"
#include "aquakv/hadamard.h"
#include "aquakv/half.h"
#include "cpu_common.h"

namespace aquakv::cpu {

AQUAKV_TARGET_CLONES void fwht_f32(float* x, int64_t n) { fwht_inplace(x, n); }

AQUAKV_TARGET_CLONES void nearest_f32(const float* y, int64_t m, const float* grid, const float* half_norm, int64_t n,
                                      int64_t d, float* best, int32_t* code) {
  nearest_soa_any(y, m, grid, half_norm, n, d, best, code);
}

namespace {

// y[i*D + k] = grid[code[i]*D + k] with the grid dimension D known at compile time, so that the copy unrolls.
template <int D>
inline void gather_grid(const int32_t* __restrict code, int64_t m, const float* __restrict grid, float* __restrict y) {
  for (int64_t i = 0; i < m; ++i)
    for (int k = 0; k < D; ++k) y[i * D + k] = grid[code[i] * D + k];
}

inline void gather_grid_any(const int32_t* __restrict code, int64_t m, int64_t d, const float* __restrict grid,
                            float* __restrict y) {
  switch (d) {
    case 1: return gather_grid<1>(code, m, grid, y);
    case 2: return gather_grid<2>(code, m, grid, y);
    case 4: return gather_grid<4>(code, m, grid, y);
    default:
      for (int64_t i = 0; i < m; ++i)
        for (int64_t k = 0; k < d; ++k) y[i * d + k] = grid[code[i] * d + k];
  }
}

// y[0..8) = (T0 + T1) + (T2 + T3): the radix-8 step of fwht_inplace over the grid points of 4 codes.
inline void pair_block(const float* __restrict table, int64_t n, const int32_t* __restrict code, float* __restrict y) {
  const float* t0 = table + code[0] * 8;
  const float* t1 = table + (n + code[1]) * 8;
  const float* t2 = table + (2 * n + code[2]) * 8;
  const float* t3 = table + (3 * n + code[3]) * 8;
  for (int p = 0; p < 8; ++p) y[p] = (t0[p] + t1[p]) + (t2[p] + t3[p]);
}

}  // namespace

void fwht8_pair_table(const float* grid, int64_t n, float* table) {
  for (int64_t j = 0; j < 4; ++j)
    for (int64_t c = 0; c < n; ++c) {
      const float plus = grid[2 * c] + grid[2 * c + 1], minus = grid[2 * c] - grid[2 * c + 1];
      for (int64_t p = 0; p < 8; ++p) {
        const float a = (p & 1) ? minus : plus;                  // first stage: the pair's sum or difference
        const bool negative = __builtin_popcountll(p & (2 * j)) & 1;  // sign of H8[p][2j]
        table[(j * n + c) * 8 + p] = negative ? -a : a;
      }
    }
}

// The same float32 operations, in the same order, as the CUDA epilogue (aquakv/aqua.cuh):
// r = FWHT(grid[codes]) * (s/G) * sign per group, hat = (pred + bias) + r, then RoPE per head.
AQUAKV_TARGET_CLONES void aqua_row_f32(const AquaRowArgs& a, const int32_t* __restrict code,
                                       const float* __restrict group_scale, const float* __restrict pred,
                                       const float* __restrict cos, const float* __restrict sin,
                                       float* __restrict hat, float* __restrict rotated) {
  const int64_t G = a.group_size, m = G / a.d;
  for (int64_t g = 0; g < a.groups; ++g) {
    float* y = hat + g * G;
    if (a.pair_table) {
      for (int64_t blk = 0; blk < G / 8; ++blk) pair_block(a.pair_table, a.n, code + g * m + blk * 4, y + blk * 8);
      for (int64_t h = 8; h < G; h *= 2) fwht_stage(y, G, h);
    } else {
      gather_grid_any(code + g * m, m, a.d, a.grid, y);
      fwht_inplace(y, G);
    }
    const float scale = group_scale[g];
    const float* sg = a.signs;
    for (int64_t i = 0; i < G; ++i) y[i] = scale * sg[i] * y[i];
  }
  // Contiguous runs (one predictor group, one half head) so that the loops vectorise.
  if (pred) {
    for (int64_t pg = 0; pg < a.pred_groups; ++pg) {
      const float* __restrict pr = pred + pg * a.pred_group_stride;
      const float* __restrict bc = a.bias + pg * a.pred_cols;
      float* __restrict hc = hat + pg * a.pred_cols;
      for (int64_t j = 0; j < a.pred_cols; ++j) hc[j] = (pr[j] + bc[j]) + hc[j];
    }
  } else {
    const int64_t C = a.groups * G;
    for (int64_t c = 0; c < C; ++c) hat[c] = (0.f + a.bias[c]) + hat[c];
  }
  const int64_t D = a.head_dim, half = D / 2;
  for (int64_t h = 0; h < a.heads; ++h) {
    const float* __restrict x = hat + h * D;
    float* __restrict v = rotated + h * D;
    if (cos) {
      for (int64_t k = 0; k < half; ++k) v[k] = x[k] * cos[k] + -x[k + half] * sin[k];
      for (int64_t k = half; k < D; ++k) v[k] = x[k] * cos[k] + x[k - half] * sin[k];
    } else {
      for (int64_t k = 0; k < D; ++k) v[k] = x[k];
    }
  }
}

AQUAKV_TARGET_CLONES void load_row_f16(const uint16_t* __restrict x, const float* __restrict signs,
                                       float* __restrict out, int64_t n) {
  if (signs) {
    for (int64_t i = 0; i < n; ++i) out[i] = half_bits_to_float(x[i]) * signs[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = half_bits_to_float(x[i]);
  }
}

AQUAKV_TARGET_CLONES void store_row_f16(const float* __restrict y, float scale, const float* __restrict signs,
                                        uint16_t* __restrict out, int64_t n) {
  if (signs) {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_half_bits(scale * signs[i] * y[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_half_bits(scale * y[i]);
  }
}

}  // namespace aquakv::cpu
