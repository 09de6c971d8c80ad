// The matmul half of aqua_reconstruct, shared by the CPU and CUDA launchers: ATen's float32 batched
// matmul (MKL / cuBLAS) is the right tool for it; the fused epilogues read its result in place.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace aquakv {

// pred without the bias: sum_i inputs[i] (grouped [G, rows, C_i/G]) @ weights[i] [G, C_i/G, M], then
// @ up [G, r, C/G] when given. Returns float32 [G, rows, C/G], contiguous: channel c of row `row` is
// at (c / (C/G)) * rows * (C/G) + row * (C/G) + c % (C/G). Undefined when there are no inputs.
// Follows torch's float32 matmul settings (torch.backends.cuda.matmul.allow_tf32 on a GPU).
inline at::Tensor aqua_prediction(at::TensorList inputs, at::TensorList weights, const std::optional<at::Tensor>& up,
                                  const ReconShape& s) {
  if (inputs.empty()) return at::Tensor();
  const int64_t rows = s.batch * s.tokens, groups = s.pred_groups;
  at::Tensor acc;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor x = inputs[i].reshape({rows, groups, inputs[i].size(2) / groups}).transpose(0, 1);
    at::Tensor part = at::bmm(x, weights[i]);  // [G, rows, M]
    acc = acc.defined() ? acc.add_(part) : part;
  }
  if (up.has_value()) acc = at::bmm(acc, *up);  // [G, rows, C/G]
  return acc.contiguous();
}

}  // namespace aquakv
