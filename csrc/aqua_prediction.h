// The matmul half of aqua_reconstruct, shared by the CPU and CUDA launchers: ATen's batched matmul
// (oneDNN / MKL / cuBLAS) is the right tool for it; the fused epilogues read its float32 result in place.
// The matmul runs in the inputs' dtype: float32, or bfloat16 (2-4x the float32 rate on CPUs with AVX512-BF16
// or AMX, and on tensor cores), accumulating in float32 and rounding its result once to bfloat16.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "checks.h"

namespace aquakv {

// pred without the bias: sum_i inputs[i] (grouped [G, rows, C_i/G]) @ weights[i] [G, C_i/G, M], then @ up
// [G, r, C/G] when given. Returns float32 [G, rows, C/G], contiguous: channel c of row `row` is at
// (c / (C/G)) * rows * (C/G) + row * (C/G) + c % (C/G). Undefined when there are no inputs.
// float32: one matmul per input, summed, reading the inputs in place. bfloat16: one matmul over the
// concatenated inputs and weights, so that the sum is accumulated in float32 and rounded once (per-input
// bfloat16 products would each be rounded, and cost a pass over memory each).
// Follows torch's matmul settings (torch.backends.cuda.matmul.allow_tf32 on a GPU).
inline at::Tensor aqua_prediction(at::TensorList inputs, at::TensorList weights, const std::optional<at::Tensor>& up,
                                  const ReconShape& s) {
  if (inputs.empty()) return at::Tensor();
  const int64_t rows = s.batch * s.tokens, groups = s.pred_groups;
  std::vector<at::Tensor> grouped;  // [G, rows, C_i/G] views
  for (const at::Tensor& x : inputs) grouped.push_back(x.reshape({rows, groups, x.size(2) / groups}).transpose(0, 1));
  at::Tensor acc;  // [G, rows, M]
  if (inputs[0].scalar_type() == at::kFloat) {
    for (size_t i = 0; i < grouped.size(); ++i) {
      const at::Tensor part = at::bmm(grouped[i], weights[i]);
      acc = acc.defined() ? acc.add_(part) : part;
    }
  } else {
    acc = grouped.size() == 1 ? at::bmm(grouped[0], weights[0]) : at::bmm(at::cat(grouped, 2), at::cat(weights, 1));
  }
  if (up.has_value()) acc = at::bmm(acc, *up);  // [G, rows, C/G]
  return acc.to(at::kFloat).contiguous();
}

}  // namespace aquakv
