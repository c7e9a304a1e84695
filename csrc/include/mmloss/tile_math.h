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

template <typename T>
MMLOSS_HD T inverse_norm(T norm) {
  return T(1) / (norm > T(kNormEps) ? norm : T(kNormEps));
}

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

// The effective margin m' = m (1 - teacher_cos) of the adaptive mode.
template <typename T>
MMLOSS_HD MarginPair<T> adaptive_margin(T cos_base, T margin, T teacher_cos) {
  const T m = margin * (T(1) - teacher_cos);
  return {cos_base, cos(m), sin(m)};
}

// Column j of row i. `removed` = group mask or teacher filter hit; the positive is never
// removed nor transformed. A NaN filter score poisons the logit (NaN in, NaN out). The scale
// 1/τ may be wider than T (the CPU keeps it in double: rounding it to fp32 would shift every
// logit by the same relative error).
template <typename T, typename Scale>
MMLOSS_HD Element<T> evaluate(T c, bool is_positive, bool removed, bool poisoned, bool has_margin,
                              const MarginPair<T>& margin, Scale inv_temp) {
  Element<T> e{is_positive || !removed, T(0), c, T(1)};
  if (has_margin && !is_positive && c < margin.cos_base) {
    arc_margin(c, margin.cos_m, margin.sin_m, e.f, e.df);
  }
  e.logit = poisoned ? static_cast<T>(NAN) : T(Scale(e.f) * inv_temp);
  return e;
}

// d(loss)/d(logit_ij) for row weight w: w (P_ij - [j is the positive]).
template <typename T>
MMLOSS_HD T logit_grad(T logit, T lse, T weight, bool is_positive) {
  return weight * (exp(logit - lse) - (is_positive ? T(1) : T(0)));
}

}  // namespace mmloss
