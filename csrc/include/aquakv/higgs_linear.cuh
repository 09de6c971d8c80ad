// higgs_linear on the GPU: y = x W^T (+ bias) with W given by its HIGGS codes, never materialised. Torch-free.
//
// Same algebra as the host kernel (aquakv/higgs_linear.h): row j of W is groups of G values decoding to
// s_jg/G * D H grid[codes_jg], so y_j = sum_g s_jg/G * < H(D x_g), grid[codes_jg] >. Two launches:
//   1. rotate: xr = H(signs * x_g) per group of every row of x, float32, into a scratch [batch, in]; each tile of
//      whole groups is staged in shared memory and transformed there with one barrier per butterfly stage
//      (ascending strides, (a + b, a - b): the host FWHT's order). The input is rotated once, not once per
//      output tile.
//   2. gemv: the grid (n x d floats) in shared memory; one warp per (output row j, tile of kB rows of x). Lane l
//      takes the sub-vectors i = l, l + 32, ... of every group: unpacks code i straight from the packed bytes,
//      looks its point up in the shared grid and dots it with xr (kB float32 partial sums in registers); the
//      group's partial sums are scaled by s_jg/G, then the warp reduces with shuffles. The bias is added in
//      float32 and y is rounded once to x's dtype. Only codes, scales and xr are read from device memory.
// Batches larger than kB re-read the codes once per tile of kB rows: the kernel is made for decode (batch 1-16);
// see docs/ops.md.
#pragma once

#include "aquakv/cuda_common.cuh"

namespace aquakv::cuda {

constexpr int kLinearThreads = 256;             // 8 warps per block, both launches
constexpr int kLinearRotateFloats = 4096;       // rotate: a tile of at least this many values (or one group)
constexpr int kLinearGridSmemFloats = 4096;     // gemv: grids up to this many floats live in shared memory

struct LinearCudaArgs {
  const void* x;          // [batch, in] in dtype T
  const float* signs;     // [G]
  float* xr;              // [batch, in] float32 scratch: written by rotate, read by gemv
  const uint8_t* codes;   // [out, groups * group_bytes]
  const uint16_t* scales; // fp16 bits [out, groups]
  const float* grid;      // [n_points, d] in device memory
  const void* bias;       // [out] in dtype T, or nullptr
  void* y;                // [batch, out] in dtype T
  int64_t batch, in, out;
  int log_g;              // G = 2^log_g
  int n_points, d, code_bits;
};

// rotate's tile: whole groups, at least kLinearRotateFloats values (both powers of two, so a multiple of G).
AQUAKV_HD AQUAKV_INLINE int64_t linear_rotate_tile(int log_g) {
  const int64_t g = int64_t{1} << log_g;
  return g > kLinearRotateFloats ? g : kLinearRotateFloats;
}
inline int64_t linear_rotate_tiles(const LinearCudaArgs& a) {
  const int64_t t = linear_rotate_tile(a.log_g);
  return (a.batch * a.in + t - 1) / t;
}
inline size_t linear_rotate_smem(const LinearCudaArgs& a) { return sizeof(float) * linear_rotate_tile(a.log_g); }

// gemv's rows of x per warp: the smallest of 1, 2, 4, 8 covering the batch (8 beyond).
inline int linear_batch_tile(int64_t batch) { return batch <= 1 ? 1 : batch <= 2 ? 2 : batch <= 4 ? 4 : 8; }
AQUAKV_HD AQUAKV_INLINE int64_t linear_warp_items(const LinearCudaArgs& a, int kb) {
  return a.out * ((a.batch + kb - 1) / kb);
}
inline int64_t linear_gemv_blocks(const LinearCudaArgs& a, int kb) {
  return (linear_warp_items(a, kb) + kLinearThreads / 32 - 1) / (kLinearThreads / 32);
}
AQUAKV_HD AQUAKV_INLINE bool linear_grid_in_smem(const LinearCudaArgs& a) {
  return a.n_points * a.d <= kLinearGridSmemFloats;
}
inline size_t linear_gemv_smem(const LinearCudaArgs& a) {
  return linear_grid_in_smem(a) ? sizeof(float) * a.n_points * a.d : 0;
}

AQUAKV_HD_TEMPLATE
template <typename T, class Simt>
AQUAKV_HD void higgs_linear_rotate_body(const Simt& simt, const LinearCudaArgs& a, float* smem) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t tile = linear_rotate_tile(a.log_g), total = a.batch * a.in;
  const int64_t g_mask = (int64_t{1} << a.log_g) - 1;
  const int tid = simt.thread(), nt = simt.threads();
  for (int64_t base = simt.block() * tile; base < total; base += simt.blocks() * tile) {
    for (int64_t i = tid; i < tile; i += nt)
      smem[i] = base + i < total ? mul_rn(to_float(x[base + i]), a.signs[i & g_mask]) : 0.f;
    simt.sync();
    for (int64_t h = 1; h <= g_mask; h *= 2) {
      for (int64_t p = tid; p < tile / 2; p += nt) {
        const int64_t i = (p / h) * 2 * h + p % h;
        const float u = smem[i], v = smem[i + h];
        smem[i] = add_rn(u, v);
        smem[i + h] = u - v;
      }
      simt.sync();
    }
    for (int64_t i = tid; i < tile; i += nt)
      if (base + i < total) a.xr[base + i] = smem[i];
    simt.sync();  // the next tile overwrites smem
  }
}

// Code i of a group whose packed codes start at p (LSB-first bitstream of code_bits-wide fields): reads only
// the 1-3 bytes the field touches, so the last code of the buffer never reads past it.
AQUAKV_HD AQUAKV_INLINE uint32_t linear_code_at(const uint8_t* p, int64_t i, int code_bits) {
  const int64_t bit = i * code_bits;
  const int shift = static_cast<int>(bit & 7);
  const int bytes = (shift + code_bits + 7) >> 3;
  uint32_t v = 0;
  for (int k = 0; k < bytes; ++k) v |= static_cast<uint32_t>(p[(bit >> 3) + k]) << (8 * k);
  return (v >> shift) & ((1u << code_bits) - 1u);
}

AQUAKV_HD_TEMPLATE
template <typename T, int kB, class Simt>
AQUAKV_HD void higgs_linear_gemv_body(const Simt& simt, const LinearCudaArgs& a, float* smem) {
  const int tid = simt.thread(), lane = tid & 31, warp = tid >> 5, warps = simt.threads() >> 5;
  const int d = a.d;
  const float* grid = a.grid;
  if (linear_grid_in_smem(a)) {
    for (int i = tid; i < a.n_points * d; i += simt.threads()) smem[i] = a.grid[i];
    simt.sync();
    grid = smem;
  }
  const int64_t G = int64_t{1} << a.log_g, groups = a.in >> a.log_g, m = G / d;
  const int64_t group_bytes = m * a.code_bits / 8;
  const float inv_g = 1.f / static_cast<float>(G);
  const int64_t items = linear_warp_items(a, kB);
  // Every warp of the block runs the same number of iterations (idle ones on a dummy item), so the shuffles
  // stay block-uniform, as the host emulator requires.
  for (int64_t first = simt.block() * warps; first < items; first += simt.blocks() * warps) {
    const int64_t item = first + warp;
    const bool valid = item < items;
    const int64_t j = valid ? item % a.out : 0, b0 = valid ? (item / a.out) * kB : 0;
    float acc[kB];
    AQUAKV_UNROLL
    for (int b = 0; b < kB; ++b) acc[b] = 0.f;
    const uint8_t* row_codes = a.codes + j * groups * group_bytes;
    for (int64_t g = 0; valid && g < groups; ++g) {
      float part[kB];
      AQUAKV_UNROLL
      for (int b = 0; b < kB; ++b) part[b] = 0.f;
      for (int64_t i = lane; i < m; i += 32) {
        const float* pt = grid + static_cast<int64_t>(linear_code_at(row_codes + g * group_bytes, i, a.code_bits)) * d;
        const int64_t col = g * G + i * d;
        AQUAKV_UNROLL
        for (int b = 0; b < kB; ++b) {
          if (b0 + b < a.batch) {
            const float* xr = a.xr + (b0 + b) * a.in + col;
            for (int k = 0; k < d; ++k) part[b] += pt[k] * xr[k];
          }
        }
      }
      const float s = bits16_to_float(a.scales[j * groups + g], static_cast<__half*>(nullptr)) * inv_g;
      AQUAKV_UNROLL
      for (int b = 0; b < kB; ++b) acc[b] += s * part[b];
    }
    AQUAKV_UNROLL
    for (int b = 0; b < kB; ++b)
      for (int mask = 16; mask >= 1; mask >>= 1) acc[b] += simt.shfl_xor(acc[b], mask);
    if (valid && lane == 0) {
      const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[j]) : 0.f;
      T* y = static_cast<T*>(a.y);
      AQUAKV_UNROLL
      for (int b = 0; b < kB; ++b)
        if (b0 + b < a.batch) y[(b0 + b) * a.out + j] = from_float<T>(acc[b] + bias);
    }
  }
}

#if defined(__CUDACC__) && !defined(AQUAKV_HOST_EMULATION)
template <typename T>
__global__ void __launch_bounds__(kLinearThreads) higgs_linear_rotate_kernel(LinearCudaArgs a) {
  higgs_linear_rotate_body<T>(DeviceSimt{}, a, dynamic_smem());
}
template <typename T, int kB>
__global__ void __launch_bounds__(kLinearThreads) higgs_linear_gemv_kernel(LinearCudaArgs a) {
  higgs_linear_gemv_body<T, kB>(DeviceSimt{}, a, dynamic_smem());
}

template <typename T, int kB>
inline cudaError_t higgs_linear_gemv_launch(const LinearCudaArgs& a, cudaStream_t stream) {
  const auto kernel = higgs_linear_gemv_kernel<T, kB>;
  const size_t smem = linear_gemv_smem(a);
  if (cudaError_t err = allow_smem(kernel, smem); err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid_for(linear_gemv_blocks(a, kB))), kLinearThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// Launches both kernels on `stream`: a.xr must hold batch * in floats. Returns the launch status.
template <typename = void>  // instantiates the kernels only where the launcher is called
inline cudaError_t higgs_linear(DType dtype, const LinearCudaArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.out == 0) return cudaSuccess;
  AQUAKV_CUDA_DISPATCH_DTYPE(dtype, T, {
    if (a.in > 0) {
      const auto rotate = higgs_linear_rotate_kernel<T>;
      const size_t smem = linear_rotate_smem(a);
      if (cudaError_t err = allow_smem(rotate, smem); err != cudaSuccess) return err;
      rotate<<<static_cast<unsigned>(grid_for(linear_rotate_tiles(a))), kLinearThreads, smem, stream>>>(a);
      if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    switch (linear_batch_tile(a.batch)) {
      case 1: return higgs_linear_gemv_launch<T, 1>(a, stream);
      case 2: return higgs_linear_gemv_launch<T, 2>(a, stream);
      case 4: return higgs_linear_gemv_launch<T, 4>(a, stream);
      default: return higgs_linear_gemv_launch<T, 8>(a, stream);
    }
  });
  return cudaSuccess;
}
#endif

}  // namespace aquakv::cuda
