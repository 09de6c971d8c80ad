// CUDA launcher of aquakv::aqua_reconstruct: the prediction's matmuls through ATen (cuBLAS), then the
// fused epilogue of csrc/include/aquakv/aqua.cuh. When one segment of lcm(D, group_size) channels does
// not fit the epilogue's shared-memory tile, r is dequantized first (higgs_dequantize's kernel, float32)
// and the epilogue reads it from there: same values, one extra float32 round trip.
#include <torch/library.h>

#include "aqua_prediction.h"
#include "aquakv/aqua.cuh"
#include "aquakv/higgs.cuh"
#include "checks.h"
#include "launch_common.cuh"

namespace aquakv::cuda {
namespace {

void aqua_reconstruct_cuda(const at::Tensor& codes_in, const at::Tensor& scales_in, const at::Tensor& grid_in,
                           const at::Tensor& signs_in, int64_t group_size, at::TensorList inputs,
                           at::TensorList weights, const std::optional<at::Tensor>& up, const at::Tensor& bias_in,
                           const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
                           const at::Tensor& out, const std::optional<at::Tensor>& hat_out) {
  const ReconShape s = check_aqua_reconstruct_args(codes_in, scales_in, grid_in, signs_in, group_size, inputs,
                                                   weights, up, bias_in, cos_in, sin_in, out, hat_out);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const int64_t rows = s.batch * s.tokens;
  if (rows * s.channels == 0) return;
  const at::Tensor pred = aqua_prediction(inputs, weights, up, s);
  const at::Tensor codes = contiguous_aligned(codes_in), scales = contiguous_aligned(scales_in);
  const at::Tensor grid = contiguous_aligned(grid_in), signs = contiguous_aligned(signs_in);
  const at::Tensor bias = bias_in.contiguous();
  const at::Tensor cos = s.rotated ? cos_in->contiguous() : at::Tensor();
  const at::Tensor sin = s.rotated ? sin_in->contiguous() : at::Tensor();

  ReconArgs a{};
  a.codes = codes.const_data_ptr<uint8_t>();
  a.scales = reinterpret_cast<const __half*>(scales.const_data_ptr<at::Half>());
  a.grid = grid.const_data_ptr<float>();
  a.signs = signs.const_data_ptr<float>();
  a.log_g = log2_of_power_of_two(group_size);
  a.d = static_cast<int>(s.higgs.d);
  a.code_bits = s.higgs.code_bits;
  a.pred = pred.defined() ? pred.const_data_ptr<float>() : nullptr;
  a.pred_cols = pred.defined() ? s.channels / s.pred_groups : 0;
  a.bias = bias.const_data_ptr<float>();
  a.cos = s.rotated ? cos.const_data_ptr<float>() : nullptr;
  a.sin = s.rotated ? sin.const_data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  for (int i = 0; i < 4; ++i) a.out_stride[i] = out.stride(i);
  if (hat_out.has_value()) {
    a.hat = hat_out->data_ptr<float>();
    for (int i = 0; i < 3; ++i) a.hat_stride[i] = hat_out->stride(i);
  }
  a.batch = s.batch;
  a.tokens = s.tokens;
  a.channels = s.channels;
  a.head_dim = s.head_dim;

  at::Tensor residual;
  if (recon_tile_values(s.head_dim, group_size) == 0) {
    residual = at::empty({rows, s.channels}, scales.options().dtype(at::kFloat));
    HiggsArgs h = args_for(s.higgs, grid, signs);
    h.values = residual.data_ptr();
    h.codes = const_cast<uint8_t*>(a.codes);
    h.scales = const_cast<__half*>(a.scales);
    check_launch("aqua_reconstruct", higgs_dequantize(DType::kFloat32, a.log_g, h, current_stream()));
    a.residual = residual.const_data_ptr<float>();
  }
  check_launch("aqua_reconstruct", aqua_reconstruct(dtype_of(out.scalar_type()), a, current_stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CUDA, m) { m.impl("aqua_reconstruct", &aqua_reconstruct_cuda); }

}  // namespace aquakv::cuda
