// Dense LSB-first bit packing of b-bit codes (b in 1..8 or 16). Torch-free; the row kernels are host
// code, packed_row_bytes is shared with the CUDA side (bitpack.cuh).
//
// A row of `count` codes is one little-endian bitstream: code i fills bits [i*b, (i+1)*b) of the
// row, and bit k of the row lives in bit (k % 8) of byte k / 8. A row takes ceil(count*b/8) bytes;
// the unused high bits of the last byte are zero.
//
//   b = 3, codes v0..v7 (bit j of vi written vi.j):
//   byte 0 = | v2.1 v2.0 | v1.2 v1.1 v1.0 | v0.2 v0.1 v0.0 |   (msb .. lsb)
//   byte 1 = | v5.0 | v4.2 v4.1 v4.0 | v3.2 v3.1 v3.0 | v2.2 |
//   byte 2 = | v7.2 v7.1 v7.0 | v6.2 v6.1 v6.0 | v5.2 v5.1 |
//
//   b = 4:  byte j = | v(2j+1) | v(2j) |          b = 8: byte j = v(j)
//   b = 16: byte 2j = low byte of v(j), byte 2j+1 = its high byte
//
// Eight codes always fill exactly b bytes, so the kernels work in blocks of 8 codes <-> b bytes
// and finish the row with a bit-serial tail.
#pragma once

#include <cstdint>

namespace aquakv {

// Bytes of one packed row of `count` codes of `bits` bits: ceil(count * bits / 8). The one definition of
// the row size, for host and device code alike; callers keep count <= 2**58 (checks.h) so count * bits
// cannot overflow.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline constexpr int64_t packed_row_bytes(int64_t count, int64_t bits) { return (count * bits + 7) / 8; }

// Pack `count` codes (low B bits of each kept) into ceil(count*B/8) bytes at out.
template <int B>
inline void pack_row(const int32_t* codes, int64_t count, uint8_t* out) {
  static_assert((B >= 1 && B <= 8) || B == 16, "bits must be in 1..8 or 16");
  constexpr uint32_t mask = (1u << B) - 1u;
  const int64_t blocks = count / 8;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int32_t* c = codes + blk * 8;
    uint8_t* o = out + blk * B;
    if constexpr (B <= 8) {
      uint64_t v = 0;
      for (int i = 0; i < 8; ++i) v |= uint64_t(uint32_t(c[i]) & mask) << (i * B);
      for (int j = 0; j < B; ++j) o[j] = uint8_t(v >> (8 * j));
    } else {
      for (int i = 0; i < 8; ++i) {
        const uint32_t v = uint32_t(c[i]) & mask;
        o[2 * i] = uint8_t(v);
        o[2 * i + 1] = uint8_t(v >> 8);
      }
    }
  }
  // Tail: fewer than 8 codes, bit-serial through an accumulator.
  uint8_t* o = out + blocks * B;
  uint32_t acc = 0;
  int nbits = 0;
  for (int64_t i = blocks * 8; i < count; ++i) {
    acc |= (uint32_t(codes[i]) & mask) << nbits;
    nbits += B;
    while (nbits >= 8) {
      *o++ = uint8_t(acc);
      acc >>= 8;
      nbits -= 8;
    }
  }
  if (nbits > 0) *o = uint8_t(acc);
}

// Unpack `count` B-bit codes from ceil(count*B/8) bytes at in.
template <int B>
inline void unpack_row(const uint8_t* in, int64_t count, int32_t* codes) {
  static_assert((B >= 1 && B <= 8) || B == 16, "bits must be in 1..8 or 16");
  constexpr uint32_t mask = (1u << B) - 1u;
  const int64_t blocks = count / 8;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint8_t* p = in + blk * B;
    int32_t* c = codes + blk * 8;
    if constexpr (B <= 8) {
      uint64_t v = 0;
      for (int j = 0; j < B; ++j) v |= uint64_t(p[j]) << (8 * j);
      for (int i = 0; i < 8; ++i) c[i] = int32_t((v >> (i * B)) & mask);
    } else {
      for (int i = 0; i < 8; ++i) c[i] = int32_t(uint32_t(p[2 * i]) | (uint32_t(p[2 * i + 1]) << 8));
    }
  }
  const uint8_t* p = in + blocks * B;
  uint32_t acc = 0;
  int nbits = 0;
  for (int64_t i = blocks * 8; i < count; ++i) {
    while (nbits < B) {
      acc |= uint32_t(*p++) << nbits;
      nbits += 8;
    }
    codes[i] = int32_t(acc & mask);
    acc >>= B;
    nbits -= B;
  }
}

}  // namespace aquakv
