// In-place fast Walsh-Hadamard transform on the host. Torch-free.
//
// Computes x <- H_n x with H_n the unnormalised +-1 Hadamard matrix in Sylvester (natural) order,
//   H_1 = [1],  H_2n = [[H_n, H_n], [H_n, -H_n]],
// so H_n H_n = n I and H_n / sqrt(n) is orthonormal and symmetric. n must be a power of two.
#pragma once

#include <cstdint>

namespace aquakv {

// One butterfly stage of half-width h: pairs (x[j], x[j + h]) -> (a + b, a - b).
// For h >= 8 the inner loop runs over h contiguous elements and vectorises.
template <typename T>
inline void fwht_stage(T* __restrict x, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 2 * h) {
    T* __restrict lo = x + i;
    T* __restrict hi = x + i + h;
    for (int64_t j = 0; j < h; ++j) {
      const T a = lo[j];
      const T b = hi[j];
      lo[j] = a + b;
      hi[j] = a - b;
    }
  }
}

// The first three stages (h = 1, 2, 4) fused on blocks of 8: a radix-8 step whose strided pairs
// would not vectorise as separate stages.
template <typename T>
inline void fwht_radix8(T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    T* v = x + i;
    const T a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
    const T a4 = v[4] + v[5], a5 = v[4] - v[5], a6 = v[6] + v[7], a7 = v[6] - v[7];
    const T b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
    const T b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
    v[0] = b0 + b4; v[1] = b1 + b5; v[2] = b2 + b6; v[3] = b3 + b7;
    v[4] = b0 - b4; v[5] = b1 - b5; v[6] = b2 - b6; v[7] = b3 - b7;
  }
}

template <typename T>
inline void fwht_inplace(T* __restrict x, int64_t n) {
  int64_t h = 1;
  if (n >= 8) {
    fwht_radix8(x, n);
    h = 8;
  }
  for (; h < n; h *= 2) fwht_stage(x, n, h);
}

}  // namespace aquakv
