// CUDA launcher of aquakv::hadamard (kernel: csrc/include/aquakv/hadamard.cuh).
#include <torch/library.h>

#include <optional>

#include "aquakv/hadamard.cuh"
#include "checks.h"
#include "launch_common.cuh"

namespace aquakv::cuda {
namespace {

at::Tensor hadamard_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& signs_in, double scale) {
  check_hadamard_args(x_in, signs_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = contiguous_aligned(x_in);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const at::Tensor signs = signs_in.has_value() ? contiguous_aligned(*signs_in) : at::Tensor();
  const HadamardArgs a{x.data_ptr(), out.data_ptr(), signs.defined() ? signs.data_ptr<float>() : nullptr,
                       static_cast<float>(scale), num_rows(x)};
  check_launch("hadamard", hadamard(dtype_of(x.scalar_type()), log2_of_power_of_two(x.size(-1)), a,
                                    current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CUDA, m) { m.impl("hadamard", &hadamard_cuda); }

}  // namespace aquakv::cuda
