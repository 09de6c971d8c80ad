// CPU kernel of aquakv::higgs_linear: a linear layer served from its HIGGS codes (aquakv/higgs_linear.h).
//   1. xr = H(signs * x_g) per group of every row of x, float32 (once: O(in log G) per row);
//   2a. batch <= kGemvRows: per output row, decode each group's grid points into L1 and dot them with every
//       row of xr (threads over output rows; the codes are read once, the float weight never exists);
//   2b. prefill: per tile of output rows, write the code-domain weight W' = s/G * grid[codes] (no inverse
//       rotation; in xr's component-major order) and let ATen's matmul do xr W'^T; the tile bounds the float buffer to kTileFloats.
// The result is float32 until it is rounded once to x's dtype, after the bias is added.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu_common.h"
#include "higgs_linear_cpu.h"

namespace aquakv::cpu {
namespace {

constexpr int64_t kGemvRows = 16;           // batch up to this: the decode-and-dot path
constexpr int64_t kTileFloats = 1 << 21;    // prefill: code-domain weight tile of at most 8 MiB

// xr [rows, in] = H(signs * x_g) per group, float32. With soa, each group is stored component-major for a
// d-dim grid (value k of sub-vector i at k * G/d + i), the layout the kernels decode small grids in.
at::Tensor rotate_input(const at::Tensor& x, const at::Tensor& signs, int64_t rows, int64_t in, int64_t G,
                        int64_t d_in, bool soa) {
  const int64_t d = soa ? d_in : 1;  // d = 1: the natural order
  at::Tensor xr = at::empty({rows, in}, x.options().dtype(at::kFloat));
  const float* sg = signs.data_ptr<float>();
  float* rp = xr.data_ptr<float>();
  const int64_t total = rows * (in / G);
  AQUAKV_DISPATCH_FLOAT(x.scalar_type(), "higgs_linear_rotate", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, total, grain_for(G), [&](int64_t begin, int64_t end) {
      std::vector<float> tmp(d > 1 ? G : 0);
      for (int64_t t = begin; t < end; ++t) {  // groups of a row follow each other, rows too
        float* y = d > 1 ? tmp.data() : rp + t * G;
        load_row(xp + t * G, sg, y, G);
        fwht_f32(y, G);
        if (d > 1) {
          const int64_t m = G / d;
          for (int64_t i = 0; i < m; ++i)
            for (int64_t k = 0; k < d; ++k) rp[t * G + k * m + i] = y[i * d + k];
        }
      }
    });
  });
  return xr;
}

at::Tensor higgs_linear_cpu(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                            const at::Tensor& grid_in, const at::Tensor& signs_in, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
  const HiggsShape s = check_higgs_linear_args(x_in, codes_in, scales_in, grid_in, signs_in, group_size, bias);
  const int64_t out_features = s.rows, in = s.channels, batch = num_rows(x_in);
  std::vector<int64_t> out_shape = with_last_dim(x_in, out_features);
  if (batch == 0 || out_features == 0) return at::empty(out_shape, x_in.options());
  if (in == 0) {  // an empty sum: y = bias (or 0)
    at::Tensor y = at::zeros(out_shape, x_in.options());
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor grid = grid_in.contiguous(), signs = signs_in.contiguous();
  const int64_t G = group_size;
  const int64_t n = grid.size(0);
  // Component-major groups for the register lookups of small grids, unless a point loop serves the batch (it
  // decodes whole points, in xr's natural order).
  const bool soa = n <= 64 && !(batch <= kGemvRows && higgs_points_serve(s.code_bits, s.d, batch));
  const at::Tensor xr = rotate_input(x, signs, batch, in, G, s.d, soa);
  std::vector<float> grid_soa(n <= 64 ? 64 * s.d : 0, 0.f);
  if (n <= 64) {
    const float* gp = grid.data_ptr<float>();
    for (int64_t c = 0; c < n; ++c)
      for (int64_t k = 0; k < s.d; ++k) grid_soa[k * 64 + c] = gp[c * s.d + k];
  }

  LinearArgs a{};
  a.batch = batch;
  a.in = in;
  a.groups = s.groups;
  a.group_size = G;
  a.d = s.d;
  a.group_bytes = s.group_bytes;
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  a.n = n;
  a.grid = grid.data_ptr<float>();
  a.grid_soa = grid_soa.data();
  a.soa = soa;
  a.xr = xr.data_ptr<float>();

  at::Tensor out_t = at::empty({out_features, batch}, x.options().dtype(at::kFloat));
  if (batch <= kGemvRows) {
    float* op = out_t.data_ptr<float>();
    at::parallel_for(0, out_features, grain_for(in * batch, int64_t{1} << 16), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> code(G / s.d);
      std::vector<float> w(G), acc(16 * batch);
      higgs_gemv_rows(a, s.code_bits, begin, end, code.data(), w.data(), acc.data(), op);
    });
  } else {
    const int64_t tile = std::max<int64_t>(1, std::min(out_features, kTileFloats / in));
    at::Tensor w_tile = at::empty({tile, in}, x.options().dtype(at::kFloat));
    float* wp = w_tile.data_ptr<float>();
    for (int64_t j0 = 0; j0 < out_features; j0 += tile) {
      const int64_t rows = std::min(tile, out_features - j0);
      at::parallel_for(0, rows, grain_for(in), [&](int64_t begin, int64_t end) {
        std::vector<int32_t> code(G / s.d);
        higgs_code_domain_rows(a, s.code_bits, j0 + begin, j0 + end, code.data(), wp + begin * in);
      });
      at::Tensor dst = out_t.narrow(0, j0, rows);
      at::mm_out(dst, w_tile.narrow(0, 0, rows), xr.t());
    }
  }
  at::Tensor y = out_t.t();
  if (bias.has_value()) y = y + bias->to(at::kFloat);
  return y.to(x.scalar_type()).contiguous().view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(aquakv, CPU, m) { m.impl("higgs_linear", &higgs_linear_cpu); }

}  // namespace aquakv::cpu
