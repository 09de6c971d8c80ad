// Shared pieces of the torch-free CUDA kernels: element types, 16-byte run loads/stores, the SIMT
// context the kernel bodies are written against, and the dispatch macros.
//
// Every kernel body is a __host__ __device__ template over a `Simt` context (thread/block ids,
// __syncthreads, __shfl_xor_sync). On the GPU it is `DeviceSimt`; tests/cuda_emulation/ runs the
// very same bodies on the host with a fiber-per-thread emulator, so the index math, barriers and
// shuffles are checked against the NumPy reference on machines without a GPU.
// Define AQUAKV_HOST_EMULATION before including to drop the __global__ kernels and launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#define AQUAKV_HD __host__ __device__
#ifdef __CUDA_ARCH__
#define AQUAKV_INLINE __forceinline__
#define AQUAKV_UNROLL _Pragma("unroll")
#else
#define AQUAKV_INLINE inline
#define AQUAKV_UNROLL
#endif
// Lets a __host__ __device__ template call the host-only emulator context without a diagnostic.
#define AQUAKV_HD_TEMPLATE _Pragma("nv_exec_check_disable")

namespace aquakv::cuda {

// Element types of the float tensors (values, not torch's ScalarType: these headers are torch-free).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
struct TypeTag {
  using type = T;
};
template <int V>
struct IntTag {
  static constexpr int value = V;
};

AQUAKV_HD AQUAKV_INLINE float to_float(float v) { return v; }
AQUAKV_HD AQUAKV_INLINE float to_float(__half v) { return __half2float(v); }
AQUAKV_HD AQUAKV_INLINE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
AQUAKV_HD AQUAKV_INLINE T from_float(float v);
template <>
AQUAKV_HD AQUAKV_INLINE float from_float<float>(float v) { return v; }
template <>
AQUAKV_HD AQUAKV_INLINE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
AQUAKV_HD AQUAKV_INLINE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Products and sums that must round exactly like the host code (no fused multiply-add).
AQUAKV_HD AQUAKV_INLINE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AQUAKV_HD AQUAKV_INLINE float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---- 16-byte accesses. Values travel as uint4 words and are unpacked into registers explicitly,
// never through a pointer to a register array (that would push the array to local memory).
AQUAKV_HD AQUAKV_INLINE uint4 load16(const void* p) {
#ifdef __CUDA_ARCH__
  return *static_cast<const uint4*>(p);
#else
  uint4 r;
  std::memcpy(&r, p, 16);
  return r;
#endif
}
AQUAKV_HD AQUAKV_INLINE void store16(void* p, uint4 v) {
#ifdef __CUDA_ARCH__
  *static_cast<uint4*>(p) = v;
#else
  std::memcpy(p, &v, 16);
#endif
}
AQUAKV_HD AQUAKV_INLINE float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
AQUAKV_HD AQUAKV_INLINE uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
AQUAKV_HD AQUAKV_INLINE uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// Four floats at a 16-byte aligned address <-> four registers.
AQUAKV_HD AQUAKV_INLINE void load_f4(const float* p, float* out) {
  const uint4 r = load16(p);
  out[0] = bits_to_float(r.x);
  out[1] = bits_to_float(r.y);
  out[2] = bits_to_float(r.z);
  out[3] = bits_to_float(r.w);
}
AQUAKV_HD AQUAKV_INLINE void store_f4(float* p, const float* in) {
  store16(p, make_uint4(float_to_bits(in[0]), float_to_bits(in[1]), float_to_bits(in[2]), float_to_bits(in[3])));
}

// 16-bit floats <-> their bit patterns (IEEE binary16 / bfloat16).
AQUAKV_HD AQUAKV_INLINE float bits16_to_float(uint32_t bits, __half*) {
  __half_raw r;
  r.x = static_cast<unsigned short>(bits);
  return __half2float(__half(r));
}
AQUAKV_HD AQUAKV_INLINE float bits16_to_float(uint32_t bits, __nv_bfloat16*) { return bits_to_float(bits << 16); }
AQUAKV_HD AQUAKV_INLINE uint32_t float_to_bits16(float v, __half*) { return __half_raw(__float2half_rn(v)).x; }
AQUAKV_HD AQUAKV_INLINE uint32_t float_to_bits16(float v, __nv_bfloat16*) {
  return __nv_bfloat16_raw(__float2bfloat16_rn(v)).x;
}

// A "run" is the 16 bytes one thread moves with one vector access: kSize = 16 / sizeof(T) values.
template <typename T>
struct RunOf {
  static constexpr int kLog = sizeof(T) == 4 ? 2 : 3;
  static constexpr int kSize = 1 << kLog;
  static_assert(kSize * sizeof(T) == 16, "a run is 16 bytes");
};

template <typename T>
AQUAKV_HD AQUAKV_INLINE void unpack_run(const uint4& raw, float* out) {
  if constexpr (sizeof(T) == 4) {
    AQUAKV_UNROLL
    for (int i = 0; i < 4; ++i) out[i] = bits_to_float(word_of(raw, i));
  } else {
    AQUAKV_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = word_of(raw, i);
      out[2 * i] = bits16_to_float(w & 0xffffu, static_cast<T*>(nullptr));
      out[2 * i + 1] = bits16_to_float(w >> 16, static_cast<T*>(nullptr));
    }
  }
}

template <typename T>
AQUAKV_HD AQUAKV_INLINE uint4 pack_run(const float* in) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
    AQUAKV_UNROLL
    for (int i = 0; i < 4; ++i) w[i] = float_to_bits(in[i]);
  } else {
    AQUAKV_UNROLL
    for (int i = 0; i < 4; ++i)
      w[i] = float_to_bits16(in[2 * i], static_cast<T*>(nullptr)) |
             float_to_bits16(in[2 * i + 1], static_cast<T*>(nullptr)) << 16;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Loads the run starting at element `at` of p as floats; elements at or past `end` read as 0
// (only the last, partial tile of a launch takes the scalar path). p + at must be 16-byte aligned.
template <typename T>
AQUAKV_HD AQUAKV_INLINE void load_run(const T* p, int64_t at, int64_t end, float* out) {
  constexpr int R = RunOf<T>::kSize;
  if (at + R <= end) {
    unpack_run<T>(load16(p + at), out);
  } else {
    AQUAKV_UNROLL
    for (int k = 0; k < R; ++k) out[k] = at + k < end ? to_float(p[at + k]) : 0.f;
  }
}

template <typename T>
AQUAKV_HD AQUAKV_INLINE void store_run(T* p, int64_t at, int64_t end, const float* in) {
  constexpr int R = RunOf<T>::kSize;
  if (at + R <= end) {
    store16(p + at, pack_run<T>(in));
  } else {
    AQUAKV_UNROLL
    for (int k = 0; k < R; ++k)
      if (at + k < end) p[at + k] = from_float<T>(in[k]);
  }
}

// R consecutive float32 values from a 16-byte aligned array (signs), R a multiple of 4.
template <int R>
AQUAKV_HD AQUAKV_INLINE void load_floats(const float* p, float* out) {
  static_assert(R % 4 == 0, "whole float4s");
  AQUAKV_UNROLL
  for (int q = 0; q < R; q += 4) load_f4(p + q, out + q);
}

#if defined(__CUDACC__) && !defined(AQUAKV_HOST_EMULATION)
// The execution context of a kernel body on the GPU.
struct DeviceSimt {
  __device__ AQUAKV_INLINE int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ AQUAKV_INLINE int threads() const { return static_cast<int>(blockDim.x); }
  __device__ AQUAKV_INLINE int64_t block() const { return blockIdx.x; }
  __device__ AQUAKV_INLINE int64_t blocks() const { return gridDim.x; }
  __device__ AQUAKV_INLINE void sync() const { __syncthreads(); }
  // Every lane of the warp calls it with the same mask (the bodies keep shuffles warp-uniform).
  __device__ AQUAKV_INLINE float shfl_xor(float v, int mask) const { return __shfl_xor_sync(0xffffffffu, v, mask); }
};

// The dynamic shared memory of the running block (one declaration for every kernel).
__device__ AQUAKV_INLINE float* dynamic_smem() {
  extern __shared__ float4 aquakv_dynamic_smem[];
  return reinterpret_cast<float*>(aquakv_dynamic_smem);
}

// Raises a kernel's dynamic shared-memory limit when it needs more than the default 48 KiB.
template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}
#endif

// Blocks for a grid-stride loop over `tiles` tiles: one tile per block up to a cap that keeps the
// launch small (each block loops over the rest).
inline int64_t grid_for(int64_t tiles) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return tiles < kMaxBlocks ? tiles : kMaxBlocks;
}

}  // namespace aquakv::cuda

// ---- dispatch: runtime values -> compile-time template arguments, in one place ---------------
// AQUAKV_CUDA_DISPATCH_DTYPE(dtype, T, stmt...) runs stmt with `using T = float|__half|__nv_bfloat16`.
// AQUAKV_CUDA_DISPATCH_LOG2(log_n, L, stmt...) runs stmt with `constexpr int L = log_n` for 1..15.
// Both fall through to `return cudaErrorInvalidValue` on a value they do not cover, so they must
// be used inside a function returning cudaError_t.
#define AQUAKV_CUDA_DISPATCH_DTYPE(dtype, T, ...)           \
  switch (dtype) {                                           \
    case ::aquakv::cuda::DType::kFloat32: {                  \
      using T = float;                                       \
      __VA_ARGS__;                                           \
    } break;                                                 \
    case ::aquakv::cuda::DType::kFloat16: {                  \
      using T = __half;                                      \
      __VA_ARGS__;                                           \
    } break;                                                 \
    case ::aquakv::cuda::DType::kBFloat16: {                 \
      using T = __nv_bfloat16;                               \
      __VA_ARGS__;                                           \
    } break;                                                 \
    default:                                                 \
      return cudaErrorInvalidValue;                          \
  }

#define AQUAKV_CUDA_LOG2_CASE(L, V, ...) \
  case V: {                              \
    constexpr int L = V;                 \
    __VA_ARGS__;                         \
  } break;

#define AQUAKV_CUDA_DISPATCH_LOG2(log_n, L, ...)  \
  switch (log_n) {                                \
    AQUAKV_CUDA_LOG2_CASE(L, 1, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 2, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 3, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 4, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 5, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 6, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 7, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 8, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 9, __VA_ARGS__)      \
    AQUAKV_CUDA_LOG2_CASE(L, 10, __VA_ARGS__)     \
    AQUAKV_CUDA_LOG2_CASE(L, 11, __VA_ARGS__)     \
    AQUAKV_CUDA_LOG2_CASE(L, 12, __VA_ARGS__)     \
    AQUAKV_CUDA_LOG2_CASE(L, 13, __VA_ARGS__)     \
    AQUAKV_CUDA_LOG2_CASE(L, 14, __VA_ARGS__)     \
    AQUAKV_CUDA_LOG2_CASE(L, 15, __VA_ARGS__)     \
    default:                                      \
      return cudaErrorInvalidValue;               \
  }
