// CPU kernel of aquakv::hadamard: y = scale * H (signs * x) over the last dim, fp32 math.
#include <torch/library.h>

#include <vector>

#include "aquakv/hadamard.h"
#include "checks.h"
#include "cpu_common.h"

namespace aquakv::cpu {
namespace {

at::Tensor hadamard_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& signs_in, double scale) {
  check_hadamard_args(x_in, signs_in);
  const at::Tensor x = x_in.contiguous();  // non-contiguous input: one copy, then the fast path
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const at::Tensor signs = signs_in.has_value() ? signs_in->contiguous() : at::Tensor();
  const float* sg = signs.defined() ? signs.data_ptr<float>() : nullptr;
  const int64_t n = x.size(-1);
  const int64_t rows = num_rows(x);
  const float fscale = static_cast<float>(scale);

  AQUAKV_DISPATCH_FLOAT(x.scalar_type(), "hadamard_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(n);
      for (int64_t r = begin; r < end; ++r) {
        load_row(xp + r * n, sg, buf.data(), n);
        fwht_f32(buf.data(), n);
        store_row(buf.data(), fscale, nullptr, op + r * n, n);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CPU, m) { m.impl("hadamard", &hadamard_cpu); }

}  // namespace aquakv::cpu
