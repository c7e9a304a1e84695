// Per-element and per-row math of the core op (SPEC §1), shared by the CPU kernels and the
// CUDA kernels: only tiling and data movement differ between them. No ATen, no std:: beyond
// <cmath>, so that nvcc compiles it for the device without a CUDA torch.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MMLOSS_HD __host__ __device__ __forceinline__
#else
#define MMLOSS_HD inline
#endif

namespace mmloss {

// ε of F.normalize: â = a / max(‖a‖, ε).
constexpr double kNormEps = 1e-12;
// ε in sqrt(max(1 - c², ε)) of the closed-form angular margin.
constexpr double kMarginSinEps = 1e-12;

// What one column j contributes to row i: whether it is allowed, its logit, and the
// transformed similarity f with its derivative df/dc (for the backward pass).
template <typename T>
struct Element {
  bool allowed;
  T logit;
  T f;
  T df;
};

// Margin settings of one row/column pair. cos_base = cos(m) decides which negatives are
// transformed (c < cos m, as the official code); cos_m/sin_m are those of the effective m'.
template <typename T>
struct MarginPair {
  T cos_base;
  T cos_m;
  T sin_m;
};

// f = cos(θ - m') in closed form, with f' = df/dc; never goes through acos.
template <typename T>
MMLOSS_HD void arc_margin(T c, T cos_m, T sin_m, T& f, T& df) {
  const T u = T(1) - c * c;
  const T s = sqrt(u > T(kMarginSinEps) ? u : T(kMarginSinEps));
  f = c * cos_m + s * sin_m;
  df = cos_m - c * sin_m / s;
}

// sin and cos of an angle x in [0, π] (margins are). On the device the hardware's; on the host a
// polynomial that vectorises: with y = x - π/2 in [-π/2, π/2], sin x = cos y and cos x = -sin y
// from their Taylor series to y^21 (error below 1e-16 on that range).
template <typename T>
MMLOSS_HD void margin_sincos(T x, T& sin_x, T& cos_x) {
#if defined(__CUDA_ARCH__)
  sincos(x, &sin_x, &cos_x);
#else
  const T y = x - T(1.5707963267948966);
  const T y2 = y * y;
  T s = T(1.0 / 51090942171709440000.0);  // 1/21!
  T c = T(1.0 / 2432902008176640000.0);   // 1/20!
  s = s * y2 - T(1.0 / 121645100408832000.0);
  c = c * y2 - T(1.0 / 6402373705728000.0);
  s = s * y2 + T(1.0 / 355687428096000.0);
  c = c * y2 + T(1.0 / 20922789888000.0);
  s = s * y2 - T(1.0 / 1307674368000.0);
  c = c * y2 - T(1.0 / 87178291200.0);
  s = s * y2 + T(1.0 / 6227020800.0);
  c = c * y2 + T(1.0 / 479001600.0);
  s = s * y2 - T(1.0 / 39916800.0);
  c = c * y2 - T(1.0 / 3628800.0);
  s = s * y2 + T(1.0 / 362880.0);
  c = c * y2 + T(1.0 / 40320.0);
  s = s * y2 - T(1.0 / 5040.0);
  c = c * y2 - T(1.0 / 720.0);
  s = s * y2 + T(1.0 / 120.0);
  c = c * y2 + T(1.0 / 24.0);
  s = s * y2 - T(1.0 / 6.0);
  c = c * y2 - T(0.5);
  s = s * y2 + T(1);
  c = c * y2 + T(1);
  sin_x = c;
  cos_x = -(s * y);
#endif
}

// The effective margin m' = m (1 - teacher_cos) of the adaptive mode.
template <typename T>
MMLOSS_HD MarginPair<T> adaptive_margin(T cos_base, T margin, T teacher_cos) {
  MarginPair<T> pair{cos_base, T(0), T(0)};
  margin_sincos(margin * (T(1) - teacher_cos), pair.sin_m, pair.cos_m);
  return pair;
}

// Column j of row i. `removed` = group mask or teacher filter hit; the positive is never
// removed nor transformed. A NaN filter score poisons the logit (NaN in, NaN out). The scale
// 1/τ may be wider than T (the CPU keeps it in double: rounding it to fp32 would shift every
// logit by the same relative error).
template <typename T, typename Scale>
MMLOSS_HD Element<T> evaluate(T c, bool is_positive, bool removed, bool poisoned, bool has_margin,
                              const MarginPair<T>& margin, Scale inv_temp) {
  Element<T> e{is_positive || !removed, T(0), c, T(1)};
  if (has_margin) {  // branch-free inside, so that the CPU's column loop vectorises
    T arc_f, arc_df;
    arc_margin(c, margin.cos_m, margin.sin_m, arc_f, arc_df);
    const bool transformed = !is_positive && c < margin.cos_base;
    e.f = transformed ? arc_f : c;
    e.df = transformed ? arc_df : T(1);
  }
  e.logit = poisoned ? static_cast<T>(NAN) : T(Scale(e.f) * inv_temp);
  return e;
}

}  // namespace mmloss
