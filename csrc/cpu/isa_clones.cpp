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
