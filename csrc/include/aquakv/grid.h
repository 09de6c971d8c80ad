// Nearest grid point search on the host. Torch-free.
//
// code = argmin_j ||y - g_j||^2 = argmax_j <y, g_j> - ||g_j||^2 / 2, the lowest j winning exact ties.
// (Halving is exact in binary floating point, so this score ranks and ties exactly like
// 2<y, g_j> - ||g_j||^2.) A NaN score never wins, so a sub-vector holding NaN gets code 0.
#pragma once

#include <cstdint>
#include <limits>

namespace aquakv {

// half_norm[j] = ||g_j||^2 / 2 for a row-major grid [n, d].
inline void grid_half_norms(const float* grid, int64_t n, int64_t d, float* half_norm) {
  for (int64_t j = 0; j < n; ++j) {
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += grid[j * d + k] * grid[j * d + k];
    half_norm[j] = 0.5f * s;
  }
}

// best, code <- s, j where s beats best (strictly: the earlier index keeps exact ties).
// Written with an integer mask rather than `better ? j : code`, which GCC keeps as a branch and
// then refuses to vectorise ("control flow in loop").
inline void keep_better(float s, int32_t j, float& best, int32_t& code) {
  const int32_t mask = -int32_t(s > best);
  best = s > best ? s : best;
  code = (j & mask) | (code & ~mask);
}

// Nearest grid point for m sub-vectors stored component-major (structure of arrays):
// component k of sub-vector i is y[k * m + i]. D > 0 fixes the grid dim at compile time;
// D == 0 reads it from d. best (scratch) and code (result) hold m entries.
// The loop over i is innermost and branch-free, so it vectorises; callers keep m small (a tile
// of a few hundred) so y, best and code stay in L1 while the grid streams past.
template <int D>
inline void nearest_soa(const float* __restrict y, int64_t m, const float* __restrict grid,
                        const float* __restrict half_norm, int64_t n, int64_t d, float* __restrict best,
                        int32_t* __restrict code) {
  const int64_t dim = D > 0 ? D : d;
  for (int64_t i = 0; i < m; ++i) {
    best[i] = -std::numeric_limits<float>::infinity();
    code[i] = 0;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* g = grid + j * dim;
    const float hn = half_norm[j];
    const int32_t jj = int32_t(j);
    if constexpr (D == 1) {
      const float g0 = g[0];
      for (int64_t i = 0; i < m; ++i) {
        const float s = y[i] * g0 - hn;
        keep_better(s, jj, best[i], code[i]);
      }
    } else if constexpr (D == 2) {
      const float g0 = g[0], g1 = g[1];
      for (int64_t i = 0; i < m; ++i) {
        const float s = y[i] * g0 + y[m + i] * g1 - hn;
        keep_better(s, jj, best[i], code[i]);
      }
    } else if constexpr (D == 4) {
      const float g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];
      for (int64_t i = 0; i < m; ++i) {
        const float s = (y[i] * g0 + y[m + i] * g1) + (y[2 * m + i] * g2 + y[3 * m + i] * g3) - hn;
        keep_better(s, jj, best[i], code[i]);
      }
    } else {
      for (int64_t i = 0; i < m; ++i) {
        float s = 0.f;
        for (int64_t k = 0; k < dim; ++k) s += y[k * m + i] * g[k];
        s -= hn;
        keep_better(s, jj, best[i], code[i]);
      }
    }
  }
}

// Runtime-d entry point: picks the specialised loop for d in {1, 2, 4}.
inline void nearest_soa_any(const float* y, int64_t m, const float* grid, const float* half_norm, int64_t n, int64_t d,
                            float* best, int32_t* code) {
  switch (d) {
    case 1: nearest_soa<1>(y, m, grid, half_norm, n, d, best, code); break;
    case 2: nearest_soa<2>(y, m, grid, half_norm, n, d, best, code); break;
    case 4: nearest_soa<4>(y, m, grid, half_norm, n, d, best, code); break;
    default: nearest_soa<0>(y, m, grid, half_norm, n, d, best, code); break;
  }
}

}  // namespace aquakv
