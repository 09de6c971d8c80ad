// The ISA-cloned entry points of higgs_linear's CPU kernel (higgs_linear_clones.cpp).
#pragma once

#include <cstdint>

#include "aquakv/higgs_linear.h"

namespace aquakv::cpu {

// y transposed, out_t [out, batch], for output rows [j0, j1); scratch code [G/d], w [G], acc [16 * batch].
void higgs_gemv_rows(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, int32_t* code, float* w,
                     float* acc, float* out_t);
// The same rows for 4-, 6- and 8-bit codes decoded point by point in registers, on AVX-512
// (higgs_linear_points_512.cpp) or AVX2 (higgs_linear_points_256.cpp); false when the layer is not of that kind
// (then nothing is written and the general loop runs).
bool higgs_gemv_rows_points_512(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, float* out_t);
bool higgs_gemv_rows_points_256(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, float* out_t);
// Whether higgs_gemv_rows will take a point loop for this layer and batch (so the launcher lays xr out point-major).
bool higgs_points_serve(int code_bits, int64_t d, int64_t batch);
// Code-domain weight rows W'[j - j0, :] = s/G * grid[codes] for [j0, j1) into w_out [(j1 - j0), in].
void higgs_code_domain_rows(const LinearArgs& a, int code_bits, int64_t j0, int64_t j1, int32_t* code,
                            float* w_out);

}  // namespace aquakv::cpu
