// The matmul half of aqua_reconstruct, shared by the CPU and CUDA launchers: ATen's batched matmul
// (oneDNN / MKL / cuBLAS) is the right tool for it; the fused epilogues read its float32 result in place.
// The matmuls run in the inputs' dtype: float32, or bfloat16 (2-3x the float32 rate on CPUs with
// AVX512-BF16 or AMX, and on tensor cores), each product rounded once to bfloat16 and summed in float32.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace aquakv {

// pred without the bias: sum_i inputs[i] (grouped [G, rows, C_i/G]) @ weights[i] [G, C_i/G, M], then
// @ up [G, r, C/G] when given. Returns float32 [G, rows, C/G], contiguous: channel c of row `row` is
// at (c / (C/G)) * rows * (C/G) + row * (C/G) + c % (C/G). Undefined when there are no inputs.
// Follows torch's matmul settings (torch.backends.cuda.matmul.allow_tf32 on a GPU).
inline at::Tensor aqua_prediction(at::TensorList inputs, at::TensorList weights, const std::optional<at::Tensor>& up,
                                  const ReconShape& s) {
  if (inputs.empty()) return at::Tensor();
  const int64_t rows = s.batch * s.tokens, groups = s.pred_groups;
  at::Tensor acc;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor x = inputs[i].reshape({rows, groups, inputs[i].size(2) / groups}).transpose(0, 1);
    const at::Tensor part = at::bmm(x, weights[i]).to(at::kFloat);  // [G, rows, M]; a no-op in float32
    acc = acc.defined() ? acc.add_(part) : part;
  }
  if (up.has_value()) acc = at::bmm(acc.to(up->scalar_type()), *up).to(at::kFloat);  // [G, rows, C/G]
  return acc.contiguous();
}

}  // namespace aquakv
