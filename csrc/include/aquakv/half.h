// IEEE binary16 <-> float32 conversions that vectorise. Torch-free, host-only.
//
// c10::Half's scalar conversions keep branches that stop GCC from vectorising row loops (measured:
// fp16 rows ran ~3x slower than fp32). These are branch-free selects with the same results:
// round-to-nearest-even, overflow to +-inf, subnormals kept, NaN -> quiet NaN 0x7e00 with the sign
// (tests/test_ops_cpu.py checks them bit for bit against torch through the hadamard op).
// After Fabian Giesen's float_to_half_fast3_rtne / half_to_float_fast5.
#pragma once

#include <cstdint>
#include <cstring>

namespace aquakv {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp_mant = uint32_t(h & 0x7fffu) << 13;
  // Reading the shifted bits as a float and multiplying by 2^(127-15) re-biases the exponent; the
  // multiply also normalises fp16 subnormals exactly (a power-of-two scale of a float is exact).
  const uint32_t scaled = float_bits(bits_float(exp_mant) * 0x1p112f);
  const uint32_t inf_nan = (0u - uint32_t(exp_mant >= (0x7c00u << 13))) & 0x7f800000u;  // fp16 exponent all ones
  return bits_float(scaled | inf_nan | sign);
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t u_signed = float_bits(f);
  const uint32_t sign = (u_signed >> 16) & 0x8000u;
  const uint32_t u = u_signed & 0x7fffffffu;
  constexpr uint32_t f16_overflow = (127u + 16u) << 23;  // |f| >= 65536 rounds to inf (65520 too, below)
  constexpr uint32_t f16_min_normal = 113u << 23;        // 2^-14
  constexpr uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  // Normal results: re-bias the exponent and round the 13 dropped bits to nearest even. A carry out
  // of the mantissa bumps the exponent, which is also right for 65520..65535 -> inf (0x7c00).
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  // Subnormal results: a float add against a magic constant rounds to nearest even for us.
  const uint32_t subnormal = float_bits(bits_float(u) + bits_float(denorm_magic)) - denorm_magic;
  // Select with all-ones masks: nested ?: stays a branch in GCC and blocks vectorisation.
  const uint32_t is_subnormal = 0u - uint32_t(u < f16_min_normal);
  const uint32_t is_overflow = 0u - uint32_t(u >= f16_overflow);
  const uint32_t is_nan = 0u - uint32_t(u > 0x7f800000u);
  const uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  const uint32_t inf_nan = 0x7c00u | (0x0200u & is_nan);
  return uint16_t(((inf_nan & is_overflow) | (finite & ~is_overflow)) | sign);
}

}  // namespace aquakv
