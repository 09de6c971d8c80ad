// CPU kernels of aquakv::higgs_quantize / higgs_dequantize, fused per group of G values:
//   quantize:   signs -> FWHT -> y = H(D x) / s -> nearest grid point per d-vector -> pack
//   dequantize: unpack -> grid lookup -> FWHT -> x = s / G * D * H y^
// (sqrt(G)/s * H_orth = H / s and s/sqrt(G) * H_orth = s/G * H, so no sqrt is taken per group.)
// higgs_quantize_scaled runs the quantize loop with the caller's s instead of the group norm.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "aquakv/bitpack.h"
#include "aquakv/dispatch.h"
#include "aquakv/grid.h"
#include "aquakv/hadamard.h"
#include "checks.h"
#include "cpu_common.h"

namespace aquakv::cpu {
namespace {

// Sub-vectors searched together: their SoA copy (d * kTile floats), best scores and codes stay in L1.
constexpr int64_t kTile = 256;

// The fused search over `total` groups of G values of x. given == nullptr: s = ||x_g|| is computed
// and stored to norms; otherwise s = given[t] (higgs_quantize_scaled) and norms is not written.
void quantize_groups(const at::Tensor& x, const at::Tensor& grid, const at::Tensor& signs, const HiggsShape& s,
                     int64_t group_size, const at::Half* given, at::Half* norms, uint8_t* cp) {
  const int64_t total = s.rows * s.groups;
  const int64_t G = group_size, d = s.d, m = G / d, n = grid.size(0);
  const float* gp = grid.data_ptr<float>();
  const float* sg = signs.data_ptr<float>();
  std::vector<float> half_norm(n);
  grid_half_norms(gp, n, d, half_norm.data());

  AQUAKV_DISPATCH_FLOAT(x.scalar_type(), "higgs_quantize_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    AQUAKV_DISPATCH_BITS(s.code_bits, B, [&] {
      // Work per group grows with the grid size: aim at ~2^22 multiply-adds per task.
      at::parallel_for(0, total, grain_for(G * n, int64_t{1} << 22), [&](int64_t begin, int64_t end) {
        std::vector<float> y(G), soa(d * kTile), best(kTile);
        std::vector<int32_t> code(m);
        for (int64_t t = begin; t < end; ++t) {
          load_row(xp + t * G, sg, y.data(), G);  // groups of a row are contiguous, rows follow each other
          const float norm = given ? static_cast<float>(given[t]) : std::sqrt(sum_squares(y.data(), G));
          fwht_f32(y.data(), G);
          // s == 0 gives y = 0 (never NaN); a non-finite s is reported through the stored scale.
          const float inv = given ? (norm != 0.f ? 1.f / norm : 0.f) : (norm > 0.f ? 1.f / norm : 0.f);
          for (int64_t i = 0; i < G; ++i) y[i] *= inv;
          for (int64_t i0 = 0; i0 < m; i0 += kTile) {
            const int64_t len = std::min(kTile, m - i0);
            for (int64_t i = 0; i < len; ++i)
              for (int64_t k = 0; k < d; ++k) soa[k * len + i] = y[(i0 + i) * d + k];
            nearest_f32(soa.data(), len, gp, half_norm.data(), n, d, best.data(), code.data() + i0);
          }
          pack_row<B>(code.data(), m, cp + t * s.group_bytes);
          if (!given) norms[t] = static_cast<at::Half>(norm);
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> higgs_quantize_cpu(const at::Tensor& x_in, const at::Tensor& grid_in,
                                                       const at::Tensor& signs_in, int64_t group_size) {
  const HiggsShape s = check_higgs_quantize_args(x_in, grid_in, signs_in, group_size);
  const at::Tensor x = x_in.contiguous();
  at::Tensor codes = at::empty(with_last_dim(x, s.groups * s.group_bytes), x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(with_last_dim(x, s.groups), x.options().dtype(at::kHalf));
  if (s.rows * s.groups == 0) return {codes, scales};
  quantize_groups(x, grid_in.contiguous(), signs_in.contiguous(), s, group_size, nullptr,
                  scales.data_ptr<at::Half>(), codes.data_ptr<uint8_t>());
  return {codes, scales};
}

// higgs_quantize's search under the caller's scales: y = H(D x) / s, s = 0 -> y = 0, NaN s -> code 0.
at::Tensor higgs_quantize_scaled_cpu(const at::Tensor& x_in, const at::Tensor& scales_in, const at::Tensor& grid_in,
                                     const at::Tensor& signs_in, int64_t group_size) {
  const HiggsShape s = check_higgs_quantize_scaled_args(x_in, scales_in, grid_in, signs_in, group_size);
  const at::Tensor x = x_in.contiguous();
  at::Tensor codes = at::empty(with_last_dim(x, s.groups * s.group_bytes), x.options().dtype(at::kByte));
  if (s.rows * s.groups == 0) return codes;
  const at::Tensor scales = scales_in.contiguous();
  quantize_groups(x, grid_in.contiguous(), signs_in.contiguous(), s, group_size, scales.data_ptr<at::Half>(), nullptr,
                  codes.data_ptr<uint8_t>());
  return codes;
}

at::Tensor higgs_dequantize_cpu(const at::Tensor& codes_in, const at::Tensor& scales_in, const at::Tensor& grid_in,
                                const at::Tensor& signs_in, int64_t group_size, at::ScalarType dtype) {
  const HiggsShape s = check_higgs_dequantize_args(codes_in, scales_in, grid_in, signs_in, group_size, dtype);
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor signs = signs_in.contiguous();
  at::Tensor out = at::empty(with_last_dim(scales, s.channels), scales.options().dtype(dtype));
  const int64_t total = s.rows * s.groups;
  if (total == 0) return out;

  const int64_t G = group_size, d = s.d, m = G / d;
  const float* gp = grid.data_ptr<float>();
  const float* sg = signs.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const float inv_g = 1.f / static_cast<float>(G);

  AQUAKV_DISPATCH_FLOAT(dtype, "higgs_dequantize_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    AQUAKV_DISPATCH_BITS(s.code_bits, B, [&] {
      at::parallel_for(0, total, grain_for(G), [&](int64_t begin, int64_t end) {
        std::vector<float> y(G);
        std::vector<int32_t> code(m);
        for (int64_t t = begin; t < end; ++t) {
          unpack_row<B>(cp + t * s.group_bytes, m, code.data());
          for (int64_t i = 0; i < m; ++i)
            for (int64_t k = 0; k < d; ++k) y[i * d + k] = gp[code[i] * d + k];
          fwht_f32(y.data(), G);
          store_row(y.data(), static_cast<float>(sp[t]) * inv_g, sg, op + t * G, G);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CPU, m) {
  m.impl("higgs_quantize", &higgs_quantize_cpu);
  m.impl("higgs_quantize_scaled", &higgs_quantize_scaled_cpu);
  m.impl("higgs_dequantize", &higgs_dequantize_cpu);
}

}  // namespace aquakv::cpu
