// Host emulation stand-in for __half (IEEE binary16), round-to-nearest-even conversions.
#pragma once

#include "mmloss_emulation.h"

struct __half {
  uint16_t bits;
  explicit operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    if (exponent == 0) return std::copysign(std::ldexp(float(mantissa), -24), sign ? -1.f : 1.f);
    const uint32_t u = sign | (exponent == 31 ? 0x7f800000u : (exponent + 112) << 23) | mantissa << 13;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

inline float __half2float(__half h) { return float(h); }

inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};  // NaN
  if (mag >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // >= 65520 (and inf): inf
  if (mag < 0x38800000u)                                     // below 2^-14: subnormal or zero
    return {uint16_t(sign | uint16_t(std::nearbyint(std::fabs(f) * 16777216.f)))};  // exact scaling, RNE
  uint32_t r = mag - (112u << 23);  // rebias the exponent, then round the 13 dropped bits to even
  r += 0xfffu + ((r >> 13) & 1u);
  return {uint16_t(sign | (r >> 13))};
}
