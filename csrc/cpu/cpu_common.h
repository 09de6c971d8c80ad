// Helpers shared by the CPU kernels (torch-using; kernels proper live in csrc/include/aquakv/).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "aquakv/half.h"

// Runs __VA_ARGS__ with scalar_t bound to float, at::Half or at::BFloat16 (the float types the ops accept).
#define AQUAKV_DISPATCH_FLOAT(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace aquakv::cpu {

// at::parallel_for grain (minimum items per task) so that each task handles about `target` values.
inline int64_t grain_for(int64_t values_per_item, int64_t target = 1 << 15) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, values_per_item));
}

// Sum of squares with 8 independent partial sums: vectorises without -ffast-math and loses less
// precision than one running sum (error grows like log(n) instead of n).
inline float sum_squares(const float* __restrict v, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += v[i + k] * v[i + k];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += v[i] * v[i];
  return s;
}

// Element I/O between a tensor's dtype and float32 math. Loops read and write Io<T>::raw through
// raw_ptr() so that fp16 uses the vectorisable conversions of aquakv/half.h (c10::Half's keep a
// branch); float and bfloat16 conversions already vectorise.
template <typename T>
struct Io {
  using raw = T;
  static float load(T v) { return static_cast<float>(v); }
  static T store(float f) { return static_cast<T>(f); }
};

template <>
struct Io<at::Half> {
  using raw = uint16_t;  // c10::Half is a standard-layout wrapper of its uint16_t bits
  static float load(uint16_t v) { return half_bits_to_float(v); }
  static uint16_t store(float f) { return float_to_half_bits(f); }
};

template <typename T>
const typename Io<T>::raw* raw_ptr(const T* p) {
  return reinterpret_cast<const typename Io<T>::raw*>(p);
}

template <typename T>
typename Io<T>::raw* raw_ptr(T* p) {
  return reinterpret_cast<typename Io<T>::raw*>(p);
}

}  // namespace aquakv::cpu
