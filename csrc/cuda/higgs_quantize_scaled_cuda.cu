// CUDA launcher of aquakv::higgs_quantize_scaled: higgs_quantize's kernel with the caller's scales
// (csrc/include/aquakv/higgs.cuh, kGivenScales).
#include <torch/library.h>

#include "aquakv/higgs.cuh"
#include "checks.h"
#include "launch_common.cuh"

namespace aquakv::cuda {
namespace {

at::Tensor higgs_quantize_scaled_cuda(const at::Tensor& x_in, const at::Tensor& scales_in, const at::Tensor& grid_in,
                                      const at::Tensor& signs_in, int64_t group_size) {
  const HiggsShape s = check_higgs_quantize_scaled_args(x_in, scales_in, grid_in, signs_in, group_size);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = contiguous_aligned(x_in);
  at::Tensor codes = at::empty(with_last_dim(x, s.groups * s.group_bytes), x.options().dtype(at::kByte));
  if (s.rows * s.groups == 0) return codes;
  const at::Tensor scales = scales_in.contiguous();
  const at::Tensor grid = contiguous_aligned(grid_in);
  const at::Tensor signs = contiguous_aligned(signs_in);
  HiggsArgs a = args_for(s, grid, signs);
  a.values = const_cast<void*>(x.const_data_ptr());
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = reinterpret_cast<__half*>(const_cast<at::Half*>(scales.const_data_ptr<at::Half>()));  // read only
  const size_t ws_bytes = higgs_quantize_workspace_bytes(a.n_points, a.d);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes / sizeof(float))}, x.options().dtype(at::kFloat));
  check_launch("higgs_quantize_scaled",
               higgs_quantize</*kGivenScales=*/true>(dtype_of(x.scalar_type()), log2_of_power_of_two(group_size), a,
                                                     ws_bytes > 0 ? workspace.data_ptr<float>() : nullptr,
                                                     current_stream()));
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CUDA, m) { m.impl("higgs_quantize_scaled", &higgs_quantize_scaled_cuda); }

}  // namespace aquakv::cuda
