// Dense LSB-first bit packing of b-bit codes on the GPU (b in 1..8 or 16). Torch-free.
// Same layout as the host packer (csrc/include/aquakv/bitpack.h, with its pictures): code i of a
// row fills bits [i*b, (i+1)*b) of the row's stream, bit k in bit k % 8 of byte k / 8; a row takes
// ceil(count * b / 8) bytes, unused high bits of its last byte zero.
// Eight codes fill exactly b bytes, so each thread owns a block of 8 codes <-> b bytes of one row
// (the last block of a row may be shorter). Loads and stores of neighbouring threads are adjacent.
#pragma once

#include "aquakv/bitpack.h"  // packed_row_bytes, the row size shared with the host packer
#include "aquakv/cuda_common.cuh"

namespace aquakv::cuda {

struct BitpackArgs {
  int32_t* codes;   // [rows, count]: read by pack, written by unpack
  uint8_t* packed;  // [rows, ceil(count * bits / 8)]: written by pack, read by unpack
  int64_t rows;
  int64_t count;
  int bits;
};

constexpr int kBitpackThreads = 256;

AQUAKV_HD AQUAKV_INLINE int64_t bitpack_blocks_per_row(const BitpackArgs& a) { return (a.count + 7) / 8; }
inline int64_t bitpack_blocks(const BitpackArgs& a) {
  const int64_t work = a.rows * bitpack_blocks_per_row(a);
  return grid_for((work + kBitpackThreads - 1) / kBitpackThreads);
}

AQUAKV_HD_TEMPLATE
template <class Simt>
AQUAKV_HD void pack_bits_body(const Simt& simt, const BitpackArgs& a) {
  const int64_t per_row = bitpack_blocks_per_row(a);
  const int64_t work = a.rows * per_row;
  const int64_t row_bytes = packed_row_bytes(a.count, a.bits);
  const uint32_t mask = (1u << a.bits) - 1u;
  const int64_t stride = simt.blocks() * simt.threads();
  for (int64_t w = simt.block() * simt.threads() + simt.thread(); w < work; w += stride) {
    const int64_t row = w / per_row, blk = w - row * per_row;
    const int32_t* src = a.codes + row * a.count + blk * 8;
    const int cnt = static_cast<int>(a.count - blk * 8 < 8 ? a.count - blk * 8 : 8);
    uint64_t lo = 0, hi = 0;
    for (int i = 0; i < cnt; ++i) {
      const uint64_t c = static_cast<uint32_t>(src[i]) & mask;
      const int pos = i * a.bits;
      if (pos < 64) {
        lo |= c << pos;
      } else {
        hi |= c << (pos - 64);
      }
    }
    uint8_t* dst = a.packed + row * row_bytes + blk * a.bits;
    const int nbytes = (cnt * a.bits + 7) / 8;
    for (int j = 0; j < nbytes; ++j) dst[j] = static_cast<uint8_t>(j < 8 ? lo >> (8 * j) : hi >> (8 * (j - 8)));
  }
}

AQUAKV_HD_TEMPLATE
template <class Simt>
AQUAKV_HD void unpack_bits_body(const Simt& simt, const BitpackArgs& a) {
  const int64_t per_row = bitpack_blocks_per_row(a);
  const int64_t work = a.rows * per_row;
  const int64_t row_bytes = packed_row_bytes(a.count, a.bits);
  const uint64_t mask = (uint64_t{1} << a.bits) - 1u;
  const int64_t stride = simt.blocks() * simt.threads();
  for (int64_t w = simt.block() * simt.threads() + simt.thread(); w < work; w += stride) {
    const int64_t row = w / per_row, blk = w - row * per_row;
    const int cnt = static_cast<int>(a.count - blk * 8 < 8 ? a.count - blk * 8 : 8);
    const uint8_t* src = a.packed + row * row_bytes + blk * a.bits;
    const int nbytes = (cnt * a.bits + 7) / 8;
    uint64_t lo = 0, hi = 0;
    for (int j = 0; j < nbytes; ++j) {
      const uint64_t byte = src[j];
      if (j < 8) {
        lo |= byte << (8 * j);
      } else {
        hi |= byte << (8 * (j - 8));
      }
    }
    int32_t* dst = a.codes + row * a.count + blk * 8;
    for (int i = 0; i < cnt; ++i) {
      const int pos = i * a.bits;
      dst[i] = static_cast<int32_t>((pos < 64 ? lo >> pos : hi >> (pos - 64)) & mask);
    }
  }
}

#if defined(__CUDACC__) && !defined(AQUAKV_HOST_EMULATION)
// Templates only so that the header can be included by several translation units.
template <typename = void>
__global__ void __launch_bounds__(kBitpackThreads) pack_bits_kernel(BitpackArgs a) {
  pack_bits_body(DeviceSimt{}, a);
}
template <typename = void>
__global__ void __launch_bounds__(kBitpackThreads) unpack_bits_kernel(BitpackArgs a) {
  unpack_bits_body(DeviceSimt{}, a);
}

// codes [rows, count] int32 -> packed [rows, ceil(count * bits / 8)] uint8, on `stream`.
template <typename = void>  // instantiates the kernel only where the launcher is called
inline cudaError_t pack_bits(const BitpackArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.count == 0) return cudaSuccess;
  if (!((a.bits >= 1 && a.bits <= 8) || a.bits == 16)) return cudaErrorInvalidValue;
  pack_bits_kernel<><<<static_cast<unsigned>(bitpack_blocks(a)), kBitpackThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// packed [rows, ceil(count * bits / 8)] uint8 -> codes [rows, count] int32, on `stream`.
template <typename = void>
inline cudaError_t unpack_bits(const BitpackArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.count == 0) return cudaSuccess;
  if (!((a.bits >= 1 && a.bits <= 8) || a.bits == 16)) return cudaErrorInvalidValue;
  unpack_bits_kernel<><<<static_cast<unsigned>(bitpack_blocks(a)), kBitpackThreads, 0, stream>>>(a);
  return cudaGetLastError();
}
#endif

}  // namespace aquakv::cuda
