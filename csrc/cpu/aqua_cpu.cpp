// CPU kernel of aquakv::aqua_reconstruct: ATen's matmul for the prediction (csrc/aqua_prediction.h),
// then one fused pass per row (b, t): unpack the residual's codes here, then in float32 (aqua_row_f32,
// compiled per ISA): grid lookup -> FWHT -> s/G * sign (as higgs_dequantize_cpu), hat = (pred + bias) + r,
// RoPE per head; then hat -> hat_out and one rounding to out's dtype, strided stores into out[b, :, t, :].
// The CUDA epilogue (csrc/include/aquakv/aqua.cuh) does the same float32 operations in the same order.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "aqua_prediction.h"
#include "aquakv/bitpack.h"
#include "aquakv/dispatch.h"
#include "checks.h"
#include "cpu_common.h"

namespace aquakv::cpu {
namespace {

void aqua_reconstruct_cpu(const at::Tensor& codes_in, const at::Tensor& scales_in, const at::Tensor& grid_in,
                          const at::Tensor& signs_in, int64_t group_size, at::TensorList inputs, at::TensorList weights,
                          const std::optional<at::Tensor>& up, const at::Tensor& bias_in,
                          const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
                          const at::Tensor& out, const std::optional<at::Tensor>& hat_out) {
  const ReconShape s =
      check_aqua_reconstruct_args(codes_in, scales_in, grid_in, signs_in, group_size, inputs, weights, up, bias_in,
                                  cos_in, sin_in, out, hat_out);
  const int64_t rows = s.batch * s.tokens, C = s.channels;
  if (rows * C == 0) return;
  const at::Tensor pred = aqua_prediction(inputs, weights, up, s);
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor grid = grid_in.contiguous(), signs = signs_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor cos = s.rotated ? cos_in->contiguous() : at::Tensor();
  const at::Tensor sin = s.rotated ? sin_in->contiguous() : at::Tensor();

  const int64_t G = group_size, d = s.higgs.d, m = G / d, D = s.head_dim;
  const int64_t groups = s.higgs.groups, group_bytes = s.higgs.group_bytes;
  const int64_t pred_cols = pred.defined() ? C / s.pred_groups : 0, pred_group_stride = rows * pred_cols;
  const float* pp = pred.defined() ? pred.data_ptr<float>() : nullptr;
  const float* gp = grid.data_ptr<float>();
  const float* sg = signs.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* cp = s.rotated ? cos.data_ptr<float>() : nullptr;
  const float* snp = s.rotated ? sin.data_ptr<float>() : nullptr;
  const uint8_t* code_p = codes.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  float* hp = hat_out.has_value() ? hat_out->data_ptr<float>() : nullptr;
  const int64_t hs0 = hp ? hat_out->stride(0) : 0, hs1 = hp ? hat_out->stride(1) : 0, hs2 = hp ? hat_out->stride(2) : 0;
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2), os3 = out.stride(3);
  const float inv_g = 1.f / static_cast<float>(G);

  const int64_t n = grid.size(0);
  std::vector<float> pair_table;
  if (d == 2 && G >= 8) {
    pair_table.resize(4 * n * 8);
    fwht8_pair_table(gp, n, pair_table.data());
  }
  const AquaRowArgs args{groups, G, d, n, s.pred_groups, pred_cols, pred_group_stride, s.heads, D,
                         gp, sg, bp, pair_table.empty() ? nullptr : pair_table.data()};

  AQUAKV_DISPATCH_FLOAT(out.scalar_type(), "aqua_reconstruct_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    AQUAKV_DISPATCH_BITS(s.higgs.code_bits, B, [&] {
      at::parallel_for(0, rows, grain_for(C), [&](int64_t begin, int64_t end) {
        std::vector<float> hat(C), rotated(C), group_scale(groups);
        std::vector<int32_t> code(groups * m);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / s.tokens, t = row % s.tokens;
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t at = row * groups + g;
            unpack_row<B>(code_p + at * group_bytes, m, code.data() + g * m);
            group_scale[g] = static_cast<float>(sp[at]) * inv_g;
          }
          aqua_row_f32(args, code.data(), group_scale.data(), pp ? pp + row * pred_cols : nullptr,
                       cp ? cp + row * D : nullptr, cp ? snp + row * D : nullptr, hat.data(), rotated.data());
          if (hp) {
            float* dst = hp + b * hs0 + t * hs1;
            if (hs2 == 1) {
              std::copy(hat.begin(), hat.end(), dst);
            } else {
              for (int64_t c = 0; c < C; ++c) dst[c * hs2] = hat[c];
            }
          }
          for (int64_t h = 0; h < s.heads; ++h) {
            const float* v = rotated.data() + h * D;
            scalar_t* dst = op + b * os0 + h * os1 + t * os2;
            if (os3 == 1) {
              store_row(v, 1.f, nullptr, dst, D);  // 1.f * v is v exactly: one rounding to scalar_t
            } else {
              for (int64_t k = 0; k < D; ++k) dst[k * os3] = static_cast<scalar_t>(v[k]);
            }
          }
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CPU, m) { m.impl("aqua_reconstruct", &aqua_reconstruct_cpu); }

}  // namespace aquakv::cpu
