// Helpers shared by the CUDA launchers (csrc/cuda/*.cu): dtype mapping, alignment, launch checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "aquakv/higgs.cuh"
#include "checks.h"

namespace aquakv::cuda {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "aquakv: no CUDA kernel for dtype ", t);
  return DType::kFloat32;  // not reached
}

// The kernels use 16-byte vector accesses: a contiguous tensor whose data does not start on a
// 16-byte boundary (a view with a storage offset) is copied once into a fresh allocation.
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// The stream torch is using on the current device (at::cuda::getCurrentCUDAStream() is this same
// function; including it from ATen/cuda/CUDAContext.h would also require the cuBLAS/cuSPARSE headers).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The HIGGS kernel arguments that come from validated grid and signs tensors.
inline HiggsArgs args_for(const HiggsShape& s, const at::Tensor& grid, const at::Tensor& signs) {
  HiggsArgs a{};
  a.grid = grid.data_ptr<float>();
  a.signs = signs.data_ptr<float>();
  a.groups = s.rows * s.groups;
  a.n_points = static_cast<int>(grid.size(0));
  a.d = static_cast<int>(s.d);
  a.code_bits = s.code_bits;
  return a;
}

}  // namespace aquakv::cuda
