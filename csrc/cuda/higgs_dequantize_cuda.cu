// CUDA launcher of aquakv::higgs_dequantize (kernel: csrc/include/aquakv/higgs.cuh).
#include <torch/library.h>

#include "aquakv/higgs.cuh"
#include "checks.h"
#include "launch_common.cuh"

namespace aquakv::cuda {
namespace {

at::Tensor higgs_dequantize_cuda(const at::Tensor& codes_in, const at::Tensor& scales_in, const at::Tensor& grid_in,
                                 const at::Tensor& signs_in, int64_t group_size, at::ScalarType dtype) {
  const HiggsShape s = check_higgs_dequantize_args(codes_in, scales_in, grid_in, signs_in, group_size, dtype);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor out = at::empty(with_last_dim(scales, s.channels), scales.options().dtype(dtype));
  if (s.rows * s.groups == 0) return out;
  const at::Tensor codes = contiguous_aligned(codes_in);
  const at::Tensor grid = contiguous_aligned(grid_in);
  const at::Tensor signs = contiguous_aligned(signs_in);
  HiggsArgs a = args_for(s, grid, signs);
  a.values = out.data_ptr();
  a.codes = const_cast<uint8_t*>(codes.const_data_ptr<uint8_t>());
  a.scales = reinterpret_cast<__half*>(const_cast<at::Half*>(scales.const_data_ptr<at::Half>()));
  check_launch("higgs_dequantize",
               higgs_dequantize(dtype_of(dtype), log2_of_power_of_two(group_size), a, current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CUDA, m) { m.impl("higgs_dequantize", &higgs_dequantize_cuda); }

}  // namespace aquakv::cuda
