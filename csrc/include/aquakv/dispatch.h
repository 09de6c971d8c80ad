// Turning runtime values into compile-time constants, in one place. Torch-free.
#pragma once

#include <stdexcept>
#include <string>

// AQUAKV_DISPATCH_BITS(bits, B, ...): runs the lambda body __VA_ARGS__ with `constexpr int B = bits`
// for bits in 1..8 or 16 (the packed field widths: pack_bits' bits, HIGGS' code_bits). Callers validate bits first; an unsupported
// value throws std::invalid_argument here rather than silently doing nothing.
#define AQUAKV_DISPATCH_BITS(bits, B, ...)                                                   \
  [&] {                                                                                      \
    switch (bits) {                                                                          \
      case 1: { constexpr int B = 1; return __VA_ARGS__(); }                                 \
      case 2: { constexpr int B = 2; return __VA_ARGS__(); }                                 \
      case 3: { constexpr int B = 3; return __VA_ARGS__(); }                                 \
      case 4: { constexpr int B = 4; return __VA_ARGS__(); }                                 \
      case 5: { constexpr int B = 5; return __VA_ARGS__(); }                                 \
      case 6: { constexpr int B = 6; return __VA_ARGS__(); }                                 \
      case 7: { constexpr int B = 7; return __VA_ARGS__(); }                                 \
      case 8: { constexpr int B = 8; return __VA_ARGS__(); }                                 \
      case 16: { constexpr int B = 16; return __VA_ARGS__(); }                               \
      default: throw std::invalid_argument("aquakv: unsupported bit width " + std::to_string(bits)); \
    }                                                                                        \
  }()
