// exp(x) for x <= 709 in double, written so that compilers vectorise the loops that call it
// (glibc's exp does not vectorise without -ffast-math, which would break NaN semantics).
#pragma once

#include <cstdint>
#include <cstring>

namespace mmloss {
// strip_kernels.cpp compiles this header once per instruction set (MMLOSS_CPU_ISA): each copy
// in its own inline namespace, so that the linker never mixes them.
#ifdef MMLOSS_CPU_ISA
inline namespace MMLOSS_CPU_ISA {
#endif

// Relative error below 1e-15 on [-708, 709]; 0 below -708 and for -inf; NaN for NaN.
// Range reduction x = k ln2 + r with |r| <= ln2/2, then a degree-12 Taylor polynomial for e^r,
// and 2^k assembled in the exponent bits (k in [-1022, 1023]).
#pragma omp declare simd notinbranch
inline double exp_simd(double x) {
  const double clamped = x < -708.0 ? -708.0 : x;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double t = clamped * 1.4426950408889634 + shifter;
  const double k = t - shifter;
  const double r = (clamped - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
  double p = 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  const int64_t scale_bits = (bits + 1023) << 52;
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return x < -708.0 ? 0.0 : p * scale;
}

#ifdef MMLOSS_CPU_ISA
}  // namespace MMLOSS_CPU_ISA
#endif
}  // namespace mmloss
