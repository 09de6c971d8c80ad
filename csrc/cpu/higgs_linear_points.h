// What higgs_linear's point loops (higgs_linear_points_512.cpp, higgs_linear_points_256.cpp) share: how codes come
// out of the packed bytes, how the rows of xr are laid out for them, and the tile sizes. ISA-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define AQUAKV_POINTS_INLINE inline __attribute__((always_inline))  // into the ISA-specific callers, always
#else
#define AQUAKV_POINTS_INLINE inline
#endif

namespace aquakv::cpu::points {

// N bytes (2, 3, 4, 6 or 8) as a little-endian integer, in loads of power-of-two size: a memcpy of 3 or 6 bytes
// may become a library call, which made 6-bit codes 4x slower.
template <int N>
AQUAKV_POINTS_INLINE uint64_t load_le(const uint8_t* p) {
  if constexpr (N == 3) return load_le<2>(p) | (uint64_t{p[2]} << 16);
  if constexpr (N == 6) return load_le<4>(p) | (load_le<2>(p + 4) << 32);
  if constexpr (N == 2 || N == 4 || N == 8) {
    std::conditional_t<N == 2, uint16_t, std::conditional_t<N == 4, uint32_t, uint64_t>> v;
    std::memcpy(&v, p, N);
    return v;
  }
  return 0;
}

// The 16/D codes (CB bits each, LSB first as in aquakv/bitpack.h) behind 16 floats of a group, starting at cp:
// 16/D codes always fill whole bytes. They come out of one 64-bit word per 8 codes, shifted in a register (for
// byte codes too: a byte load per code was 1.3x slower on Zen 3, 3.7 vs 2.8 ms for 4096x4096 (2,256) at batch 1).
template <int D, int CB>
AQUAKV_POINTS_INLINE void codes16(const uint8_t* cp, uint32_t* code) {
  constexpr int kCodes = 16 / D, kPerWord = kCodes < 8 ? kCodes : 8;
  constexpr uint64_t kMask = (uint64_t{1} << CB) - 1;
  for (int w = 0; w < kCodes / kPerWord; ++w) {
    const uint64_t bits = load_le<kPerWord * CB / 8>(cp + w * kPerWord * CB / 8);
#pragma GCC unroll 8
    for (int l = 0; l < kPerWord; ++l) code[w * kPerWord + l] = static_cast<uint32_t>((bits >> (CB * l)) & kMask);
  }
}

// Runs the lambda with D (1, 2, 4) and CB (4, 6, 8) bound as constants.
#define AQUAKV_DISPATCH_POINTS(d, cb, ...)                                                        \
  [&] {                                                                                           \
    switch ((d) * 16 + (cb)) {                                                                    \
      case 20: { constexpr int D = 1, CB = 4; return __VA_ARGS__(); }                             \
      case 22: { constexpr int D = 1, CB = 6; return __VA_ARGS__(); }                             \
      case 24: { constexpr int D = 1, CB = 8; return __VA_ARGS__(); }                             \
      case 36: { constexpr int D = 2, CB = 4; return __VA_ARGS__(); }                             \
      case 38: { constexpr int D = 2, CB = 6; return __VA_ARGS__(); }                             \
      case 40: { constexpr int D = 2, CB = 8; return __VA_ARGS__(); }                             \
      case 68: { constexpr int D = 4, CB = 4; return __VA_ARGS__(); }                             \
      case 70: { constexpr int D = 4, CB = 6; return __VA_ARGS__(); }                             \
      default: { constexpr int D = 4, CB = 8; return __VA_ARGS__(); }                             \
    }                                                                                             \
  }()

constexpr int64_t kXrBlockFloats = 8192;  // rows of x held per column block: 32 KiB, inside L1 with the grid
constexpr int64_t kRowTile = 64;          // output rows per tile: their codes stay in L2 across column blocks

// The NB rows of xr as the kernel reads them: value k of row b at x0[(k / 16) * chunk + b * row + k % 16].
struct XrTile {
  const float* x0;
  int64_t row;    // floats between rows of x
  int64_t chunk;  // floats between 16-value chunks of one row
  AQUAKV_POINTS_INLINE const float* at(int64_t b, int64_t k) const { return x0 + (k >> 4) * chunk + b * row + (k & 15); }
};

// Rows [b0, b0 + nb) of xr [batch, in]: a single row as it is; several interleaved in 16-float chunks (the chunks
// of one column side by side, zero-padded), so that a column block of all of them is one run of memory in L1.
inline XrTile xr_tile(const float* xr, int64_t in, int64_t b0, int nb, std::vector<float>& interleaved) {
  const float* xr0 = xr + b0 * in;
  if (nb == 1) return XrTile{xr0, in, 16};
  const int64_t chunks = (in + 15) / 16;
  interleaved.assign(chunks * nb * 16, 0.f);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t floats = std::min<int64_t>(16, in - c * 16);
    for (int b = 0; b < nb; ++b)
      std::memcpy(&interleaved[(c * nb + b) * 16], xr0 + b * in + c * 16, sizeof(float) * floats);
  }
  return XrTile{interleaved.data(), 16, nb * 16};
}

}  // namespace aquakv::cpu::points
