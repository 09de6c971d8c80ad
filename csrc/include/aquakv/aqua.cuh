// The epilogue of aqua_reconstruct on the GPU: residual dequantize + prediction + bias + RoPE + cast +
// strided stores, fused. Torch-free. The prediction's matmuls run before it (cuBLAS through ATen).
//
// Work is cut into segments of L = lcm(D, G) consecutive channels of one row: a segment holds whole
// residual groups (for the Hadamard transform) and whole heads (for RoPE's rotate-half partner), so
// segments are independent. A block takes a tile of whole segments of the flat [rows, C] array (rows
// follow each other, and C is a multiple of L) and, in shared memory:
//   1. decodes every d-vector of the tile: code bits -> grid point;
//   2. FWHT over each group of G, stage by stage in ascending order (the host FWHT's butterflies, so
//      float32 results are the CPU kernel's bit for bit);
//   3. hat = (pred + bias) + (s/G * sign) * y, stored back in place and to hat_out;
//   4. out = x * cos + rotate_half(x) * sin (or x), rounded once to out's dtype, written with out's strides.
// Products and sums use mul_rn / add_rn: no fused multiply-add, the same roundings as the CPU kernel
// (csrc/cpu/aqua_cpu.cpp). When a segment does not fit in a tile (L > kReconTileFloats, e.g. G = 32768),
// the launcher dequantizes r with higgs_dequantize into a float32 buffer first and the body skips
// steps 1-2, reading r and each partner straight from that buffer (`residual`).
#pragma once

#include "aquakv/higgs.cuh"

namespace aquakv::cuda {

struct ReconArgs {
  // the residual: HIGGS codes of rows * C / G groups (csrc/include/aquakv/higgs.cuh conventions)
  const uint8_t* codes;
  const __half* scales;
  const float* grid;   // [n_points, d]
  const float* signs;  // [G]
  int log_g;
  int d;
  int code_bits;
  const float* residual;  // fallback only: r [rows, C] float32, already dequantized; null: fused decode
  // the prediction without bias, [pred_groups, rows, pred_cols] (null: no inputs, pred = 0)
  const float* pred;
  int64_t pred_cols;  // C / pred_groups
  const float* bias;  // [C]
  const float* cos;   // [rows, D] contiguous, or null (no RoPE)
  const float* sin;   // [rows, D]
  void* out;          // [B, H, T, D] with strides out_stride
  int64_t out_stride[4];
  float* hat;  // [B, T, C] with strides hat_stride, or null
  int64_t hat_stride[3];
  int64_t batch, tokens, channels, head_dim;
};

constexpr int kReconThreads = 256;
constexpr int kReconTileFloats = 4096;  // 16 KiB of shared memory per block

// Values per tile: the most whole segments of lcm(D, G) channels that fit, or 0 when one segment does
// not fit (the launcher then takes the dequantize-first path, whose tiles are any kReconTileFloats values).
inline int64_t recon_tile_values(int64_t head_dim, int64_t group_size) {
  int64_t a = head_dim, b = group_size;
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  const int64_t seg = head_dim / a * group_size;
  return seg > kReconTileFloats ? 0 : kReconTileFloats / seg * seg;
}

// The code of the d-vector starting at stream bit `bit` of an LSB-first byte stream (code_bits <= 16):
// reads only the 1-3 bytes the code touches, so never past the stream's end.
AQUAKV_HD AQUAKV_INLINE uint32_t read_code(const uint8_t* src, int64_t bit, int code_bits) {
  const uint8_t* p = src + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  uint32_t w = p[0];
  if (shift + code_bits > 8) w |= static_cast<uint32_t>(p[1]) << 8;
  if (shift + code_bits > 16) w |= static_cast<uint32_t>(p[2]) << 16;
  return (w >> shift) & ((1u << code_bits) - 1u);
}

// hat of channel c of row `row`, given its residual value r: (pred + bias) + r.
AQUAKV_HD AQUAKV_INLINE float recon_hat(const ReconArgs& a, int64_t row, int64_t c, float r) {
  float p = 0.f;
  if (a.pred != nullptr) {
    const int64_t g = c / a.pred_cols;
    const int64_t rows = a.batch * a.tokens;
    p = a.pred[(g * rows + row) * a.pred_cols + (c - g * a.pred_cols)];
  }
  return add_rn(add_rn(p, a.bias[c]), r);
}

// Rotates (x, partner) at channel c of row `row` and stores it to out[b, h, t, k] in T.
template <typename T>
AQUAKV_HD AQUAKV_INLINE void recon_store(const ReconArgs& a, int64_t row, int64_t c, float x, float partner) {
  const int64_t h = c / a.head_dim, k = c - h * a.head_dim;
  const int64_t b = row / a.tokens, t = row - b * a.tokens;
  float v = x;
  if (a.cos != nullptr) {
    const int64_t half = a.head_dim / 2;
    const float rot = k < half ? -partner : partner;
    v = add_rn(mul_rn(x, a.cos[row * a.head_dim + k]), mul_rn(rot, a.sin[row * a.head_dim + k]));
  }
  T* out = static_cast<T*>(a.out);
  out[b * a.out_stride[0] + h * a.out_stride[1] + t * a.out_stride[2] + k * a.out_stride[3]] = from_float<T>(v);
}

AQUAKV_HD AQUAKV_INLINE void recon_store_hat(const ReconArgs& a, int64_t row, int64_t c, float v) {
  if (a.hat == nullptr) return;
  const int64_t b = row / a.tokens, t = row - b * a.tokens;
  a.hat[b * a.hat_stride[0] + t * a.hat_stride[1] + c * a.hat_stride[2]] = v;
}

// Offset, within the same row, of the rotate-half partner of channel c (0 without RoPE).
AQUAKV_HD AQUAKV_INLINE int64_t partner_offset(const ReconArgs& a, int64_t c) {
  if (a.cos == nullptr) return 0;
  const int64_t half = a.head_dim / 2;
  return c % a.head_dim < half ? half : -half;
}

// Fused path: tiles of `tile_values` (whole segments, from recon_tile_values) in shared memory.
AQUAKV_HD_TEMPLATE
template <typename T, class Simt>
AQUAKV_HD void aqua_reconstruct_body(const Simt& simt, const ReconArgs& a, int64_t tile_values, float* smem) {
  const int tid = simt.thread(), nthreads = simt.threads();
  const int64_t C = a.channels, total = a.batch * a.tokens * C;
  const int64_t tiles = (total + tile_values - 1) / tile_values;
  const int G = 1 << a.log_g, d = a.d;
  const int64_t group_bits = static_cast<int64_t>(G / d) * a.code_bits;  // a multiple of 8
  const float inv_g = 1.f / static_cast<float>(G);
  for (int64_t tile = simt.block(); tile < tiles; tile += simt.blocks()) {
    const int64_t e0 = tile * tile_values;
    const int valid = static_cast<int>(total - e0 < tile_values ? total - e0 : tile_values);
    // 1. decode: the tile's groups are consecutive, so their codes are one stream from group e0 / G
    const uint8_t* src = a.codes + (e0 >> a.log_g) * (group_bits / 8);
    for (int m = tid; m < valid / d; m += nthreads) {
      const uint32_t code = read_code(src, static_cast<int64_t>(m) * a.code_bits, a.code_bits);
      for (int k = 0; k < d; ++k) smem[m * d + k] = a.grid[static_cast<int64_t>(code) * d + k];
    }
    simt.sync();
    // 2. FWHT of every group, stage h pairs (j, j + h) inside blocks of 2h
    for (int h = 1; h < G; h <<= 1) {
      for (int i = tid; i < valid / 2; i += nthreads) {
        const int j = ((i & ~(h - 1)) << 1) | (i & (h - 1));
        butterfly(smem[j], smem[j + h]);
      }
      simt.sync();
    }
    // 3. hat, in place and to hat_out
    for (int i = tid; i < valid; i += nthreads) {
      const int64_t e = e0 + i, row = e / C, c = e - row * C;
      const float f = mul_rn(to_float(a.scales[e >> a.log_g]), inv_g);
      const float r = mul_rn(mul_rn(f, a.signs[e & (G - 1)]), smem[i]);
      const float v = recon_hat(a, row, c, r);
      smem[i] = v;
      recon_store_hat(a, row, c, v);
    }
    simt.sync();
    // 4. RoPE (the partner lies in the same head, so in the tile), cast, strided store
    for (int i = tid; i < valid; i += nthreads) {
      const int64_t e = e0 + i, row = e / C, c = e - row * C;
      recon_store<T>(a, row, c, smem[i], smem[i + partner_offset(a, c)]);
    }
    simt.sync();  // shared memory free for the next tile
  }
}

// Dequantize-first path: r from a.residual ([rows, C] float32), one value per thread, no shared memory.
AQUAKV_HD_TEMPLATE
template <typename T, class Simt>
AQUAKV_HD void aqua_reconstruct_residual_body(const Simt& simt, const ReconArgs& a) {
  const int64_t C = a.channels, total = a.batch * a.tokens * C;
  const int64_t step = static_cast<int64_t>(simt.blocks()) * simt.threads();
  for (int64_t e = simt.block() * simt.threads() + simt.thread(); e < total; e += step) {
    const int64_t row = e / C, c = e - row * C, pc = c + partner_offset(a, c);
    const float v = recon_hat(a, row, c, a.residual[e]);
    recon_store_hat(a, row, c, v);
    recon_store<T>(a, row, c, v, pc == c ? v : recon_hat(a, row, pc, a.residual[row * C + pc]));
  }
}

#if defined(__CUDACC__) && !defined(AQUAKV_HOST_EMULATION)
template <typename T>
__global__ void __launch_bounds__(kReconThreads) aqua_reconstruct_kernel(ReconArgs a, int64_t tile_values) {
  aqua_reconstruct_body<T>(DeviceSimt{}, a, tile_values, dynamic_smem());
}
template <typename T>
__global__ void __launch_bounds__(kReconThreads) aqua_reconstruct_residual_kernel(ReconArgs a) {
  aqua_reconstruct_residual_body<T>(DeviceSimt{}, a);
}

// The epilogue on `stream`, out in `dtype`. With a.residual null the fused path runs; it needs
// recon_tile_values(D, G) > 0. With a.residual set (r dequantized beforehand) any shape runs.
template <typename = void>  // instantiates the kernels only where the launcher is called
inline cudaError_t aqua_reconstruct(DType dtype, const ReconArgs& a, cudaStream_t stream) {
  const int64_t total = a.batch * a.tokens * a.channels;
  if (total == 0) return cudaSuccess;
  const int64_t tile_values = recon_tile_values(a.head_dim, int64_t{1} << a.log_g);
  AQUAKV_CUDA_DISPATCH_DTYPE(dtype, T, {
    if (a.residual != nullptr) {
      const int64_t blocks = grid_for((total + kReconThreads - 1) / kReconThreads);
      aqua_reconstruct_residual_kernel<T><<<static_cast<unsigned>(blocks), kReconThreads, 0, stream>>>(a);
    } else {
      if (tile_values == 0) return cudaErrorInvalidValue;
      const int64_t blocks = grid_for((total + tile_values - 1) / tile_values);
      const size_t smem = sizeof(float) * static_cast<size_t>(tile_values);
      aqua_reconstruct_kernel<T><<<static_cast<unsigned>(blocks), kReconThreads, smem, stream>>>(a, tile_values);
    }
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;  // not reached
}
#endif

}  // namespace aquakv::cuda
