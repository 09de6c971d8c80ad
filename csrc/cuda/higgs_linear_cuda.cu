// CUDA launcher of aquakv::higgs_linear (kernels: csrc/include/aquakv/higgs_linear.cuh).
#include <torch/library.h>

#include "aquakv/higgs_linear.cuh"
#include "checks.h"
#include "launch_common.cuh"

namespace aquakv::cuda {
namespace {

at::Tensor higgs_linear_cuda(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                             const at::Tensor& grid_in, const at::Tensor& signs_in, int64_t group_size,
                             const std::optional<at::Tensor>& bias_in) {
  const HiggsShape s = check_higgs_linear_args(x_in, codes_in, scales_in, grid_in, signs_in, group_size, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t batch = num_rows(x_in);
  at::Tensor y = at::empty(with_last_dim(x_in, s.rows), x_in.options());
  if (batch == 0 || s.rows == 0) return y;
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor grid = grid_in.contiguous(), signs = signs_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor xr = at::empty({batch, s.channels}, x.options().dtype(at::kFloat));
  LinearCudaArgs a{};
  a.x = x.const_data_ptr();
  a.signs = signs.const_data_ptr<float>();
  a.xr = xr.data_ptr<float>();
  a.codes = codes.const_data_ptr<uint8_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::Half>());
  a.grid = grid.const_data_ptr<float>();
  a.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.batch = batch;
  a.in = s.channels;
  a.out = s.rows;
  a.log_g = log2_pow2(static_cast<int>(group_size));
  a.n_points = static_cast<int>(grid.size(0));
  a.d = static_cast<int>(s.d);
  a.code_bits = s.code_bits;
  check_launch("higgs_linear", higgs_linear(dtype_of(x.scalar_type()), a, current_stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CUDA, m) { m.impl("higgs_linear", &higgs_linear_cuda); }

}  // namespace aquakv::cuda
