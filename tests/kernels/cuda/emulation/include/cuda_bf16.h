// Host emulation stand-in for __nv_bfloat16, round-to-nearest-even conversion.
#pragma once

#include "mmloss_emulation.h"

struct __nv_bfloat16 {
  uint16_t bits;
  explicit operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162& operator=(const __nv_bfloat162& o) {
    mmloss_emulation::check_aligned(this, 4);
    x = o.x, y = o.y;
    return *this;
  }
};

inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
