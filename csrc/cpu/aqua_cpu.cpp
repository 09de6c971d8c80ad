// CPU kernel of aquakv::aqua_reconstruct: ATen's matmul for the prediction (csrc/aqua_prediction.h),
// then one fused pass per row (b, t): dequantize the residual's groups (unpack -> grid lookup -> FWHT
// -> s/G * sign, as higgs_dequantize_cpu), hat = (pred + bias) + r, hat -> hat_out, RoPE per head,
// one rounding to out's dtype, strided stores into out[b, :, t, :].
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

  const int64_t G = group_size, d = s.higgs.d, m = G / d, D = s.head_dim, half = D / 2;
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

  AQUAKV_DISPATCH_FLOAT(out.scalar_type(), "aqua_reconstruct_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    AQUAKV_DISPATCH_BITS(s.higgs.code_bits, B, [&] {
      at::parallel_for(0, rows, grain_for(C), [&](int64_t begin, int64_t end) {
        std::vector<float> hat(C), y(G), rotated(D);
        std::vector<int32_t> code(m);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / s.tokens, t = row % s.tokens;
          // r, group by group, exactly as higgs_dequantize_cpu computes it (float32 output)
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t at = row * groups + g;
            unpack_row<B>(code_p + at * group_bytes, m, code.data());
            for (int64_t i = 0; i < m; ++i)
              for (int64_t k = 0; k < d; ++k) y[i * d + k] = gp[code[i] * d + k];
            fwht_f32(y.data(), G);
            store_row(y.data(), static_cast<float>(sp[at]) * inv_g, sg, hat.data() + g * G, G);
          }
          // hat = (pred + bias) + r. The loops below run over contiguous channels (one predictor group, one
          // half head) so that they vectorise; each value sees the same float32 operations as the CUDA epilogue.
          if (pp) {
            for (int64_t pg = 0; pg < s.pred_groups; ++pg) {
              const float* pr = pp + pg * pred_group_stride + row * pred_cols;
              const float* bc = bp + pg * pred_cols;
              float* hc = hat.data() + pg * pred_cols;
              for (int64_t j = 0; j < pred_cols; ++j) hc[j] = (pr[j] + bc[j]) + hc[j];
            }
          } else {
            for (int64_t c = 0; c < C; ++c) hat[c] = (0.f + bp[c]) + hat[c];
          }
          if (hp) {
            float* dst = hp + b * hs0 + t * hs1;
            if (hs2 == 1) {
              std::copy(hat.begin(), hat.end(), dst);
            } else {
              for (int64_t c = 0; c < C; ++c) dst[c * hs2] = hat[c];
            }
          }
          for (int64_t h = 0; h < s.heads; ++h) {
            const float* x = hat.data() + h * D;
            float* v = rotated.data();
            if (cp) {
              const float* cs = cp + row * D;
              const float* sn = snp + row * D;
              for (int64_t k = 0; k < half; ++k) v[k] = x[k] * cs[k] + -x[k + half] * sn[k];
              for (int64_t k = half; k < D; ++k) v[k] = x[k] * cs[k] + x[k - half] * sn[k];
            } else {
              std::copy(x, x + D, v);
            }
            scalar_t* dst = op + b * os0 + h * os1 + t * os2;
            if (os3 == 1) {
              for (int64_t k = 0; k < D; ++k) dst[k] = static_cast<scalar_t>(v[k]);
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
