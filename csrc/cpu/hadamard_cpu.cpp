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
    using io = Io<scalar_t>;
    const auto* xp = raw_ptr(x.data_ptr<scalar_t>());
    auto* op = raw_ptr(out.data_ptr<scalar_t>());
    at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(n);
      float* __restrict b = buf.data();
      for (int64_t r = begin; r < end; ++r) {
        const auto* __restrict xr = xp + r * n;
        if (sg) {
          for (int64_t i = 0; i < n; ++i) b[i] = io::load(xr[i]) * sg[i];
        } else {
          for (int64_t i = 0; i < n; ++i) b[i] = io::load(xr[i]);
        }
        fwht_inplace(b, n);
        auto* __restrict orow = op + r * n;
        for (int64_t i = 0; i < n; ++i) orow[i] = io::store(fscale * b[i]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CPU, m) { m.impl("hadamard", &hadamard_cpu); }

}  // namespace aquakv::cpu
