// Per-element and per-row math of the core op (docs/contract.md §1), shared by the CPU kernels and the
// CUDA kernels: only tiling and data movement differ between them. No ATen, no std:: beyond
// <cmath>, so that nvcc compiles it for the device without a CUDA torch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MMLOSS_HD __host__ __device__ __forceinline__
#else
#define MMLOSS_HD inline
#endif

namespace mmloss {
// strip_kernels.cpp compiles this header once per instruction set (MMLOSS_CPU_ISA): each copy
// in its own inline namespace, so that the linker never mixes them.
#ifdef MMLOSS_CPU_ISA
inline namespace MMLOSS_CPU_ISA {
#endif

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

// sin and cos of an angle x in [0, π] (margins are), host and device alike: with
// y = x - π/2 in [-π/2, π/2], sin x = cos y and cos x = -sin y from their Taylor series to y^21
// (error below 1e-16 on that range). A polynomial vectorises on the CPU and, on the GPU, avoids
// sincosf's slow argument-reduction path and its local-memory stack.
template <typename T>
MMLOSS_HD void margin_sincos(T x, T& sin_x, T& cos_x) {
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
}

// The effective margin m' = m (1 - teacher_cos) of the adaptive mode.
template <typename T>
MMLOSS_HD MarginPair<T> adaptive_margin(T cos_base, T margin, T teacher_cos) {
  MarginPair<T> pair{cos_base, T(0), T(0)};
  margin_sincos(margin * (T(1) - teacher_cos), pair.sin_m, pair.cos_m);
  return pair;
}

// Mask predicates of column j in row i (docs/contract.md §1); the positive is exempt (see evaluate).
// Group mask: j shares the group of row i's positive.
MMLOSS_HD bool group_removes(int64_t key_group, int64_t row_group) { return key_group == row_group; }
// Teacher filter: j leaves the row when its score is above the threshold...
template <typename T>
MMLOSS_HD bool filter_removes(T score, T threshold) {
  return score > threshold;
}
// ...and a NaN score poisons the logit.
template <typename T>
MMLOSS_HD bool filter_poisons(T score) {
  return score != score;
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

// Hardness penalty (docs/contract.md §3): whether a negative is penalised, by scope: 0 every
// negative, 1 other rows' columns (key_owner != row_owner), 2 the row's own (==).
MMLOSS_HD bool hardness_penalises(int64_t scope, int64_t key_owner, int64_t row_owner) {
  return scope == 0 || ((key_owner == row_owner) == (scope == 2));
}
// The logit of a penalised negative, f/τ + α·c: the α·c term carries no gradient (the backward
// still uses f and f' of the Element only); `penalised` is false for positives and removed columns.
template <typename T>
MMLOSS_HD T hardness_logit(T logit, T c, T alpha, bool penalised) {
  return penalised ? logit + alpha * c : logit;
}

// The logit that enters the row's log-sum-exp: -inf for a column that is not allowed.
template <typename T>
MMLOSS_HD T masked_logit(const Element<T>& e) {
  return e.allowed ? e.logit : T(-INFINITY);
}

// ---- per-row math: online log-sum-exp and the gradient of a row's loss -------------------

// Partial log-sum-exp of some of a row's logits: sum = Σ exp(logit - lse_shift(max)). A NaN
// logit makes sum NaN whatever max is (NaN in, NaN out). {-inf, 0} is the empty set.
template <typename T>
struct LseAcc {
  T max;
  T sum;
};

// The shift of an accumulator whose largest logit is `max`: 0 when no column is allowed
// (max = -inf), so that exp(-inf - shift) = 0 instead of NaN.
template <typename T>
MMLOSS_HD T lse_shift(T max) {
  return max == T(-INFINITY) ? T(0) : max;
}

// The online update, step one: the same accumulator relative to a larger max (before adding
// exp(logit - lse_shift(max)) terms of new columns). `exp` is the caller's exponential.
template <typename T, typename Exp>
MMLOSS_HD LseAcc<T> lse_rescale(const LseAcc<T>& a, T max, Exp exp) {
  return {max, a.sum * exp(lse_shift(a.max) - lse_shift(max))};
}

// The accumulator of the union of two disjoint column sets (merging threads, warps, splits).
template <typename T, typename Exp>
MMLOSS_HD LseAcc<T> lse_combine(const LseAcc<T>& a, const LseAcc<T>& b, Exp exp) {
  const T max = a.max > b.max ? a.max : b.max;
  return {max, lse_rescale(a, max, exp).sum + lse_rescale(b, max, exp).sum};
}

// log Σ exp(logit): -inf when no column is allowed (sum 0), NaN when a logit was NaN.
template <typename T>
MMLOSS_HD T lse_value(const LseAcc<T>& a) {
  return lse_shift(a.max) + log(a.sum);
}

// dL/dlogit_ij = w_i (P_ij - [j = pos(i)]) with P_ij = e_ij / total, where e_ij = exp(logit_ij -
// shift) and w_over_total = w_i / total (a kernel with the final lse passes e = P, total = 1).
// Subtracting total before scaling keeps P - 1 exact for a positive with P close to 1.
template <typename T>
MMLOSS_HD T logit_grad(T e, T total, T w_over_total, bool is_positive) {
  return (is_positive ? e - total : e) * w_over_total;
}

// The same with several positives per row: dL/dlogit_ij = w_i (P_ij - π_ij), π_ij the column's
// share of the positive term (positive_weights_i = 1/|P_i| for j in P_i, 1 for the one
// positive, 0 for a negative). π = 1 and π = 0 give logit_grad's values bit for bit.
template <typename T>
MMLOSS_HD T logit_grad_shared(T e, T total, T w_over_total, T positive_share) {
  return (e - positive_share * total) * w_over_total;
}

// dL/dc_ij = dL/dlogit_ij · f'(c_ij) / τ (the chain rule through logit = f(c) / τ).
template <typename T, typename Scale>
MMLOSS_HD T cosine_grad(T d_logit, T df, Scale inv_temp) {
  return T(Scale(d_logit * df) * inv_temp);
}

// Row i's share of dL/d(1/τ) from column j: dL/dlogit_ij · f_ij over allowed columns (removed
// ones have P = 0 and carry no f).
template <typename T>
MMLOSS_HD T inv_temp_grad(T d_logit, T f, bool allowed) {
  return allowed ? d_logit * f : T(0);
}

// The radial coefficient of the normalisation's Jacobian: for x̂ = x / max(‖x‖, ε) with inverse
// norm `inv` and radial = Σ_j dL/dc_ij c_ij (= inv <x, dL/dx̂>), dL/dx = inv dL/dx̂ - coef x with
// coef = inv² radial; 0 where ‖x‖ <= ε (the clamp is constant there). The test is in inv's own
// type T (1/ε rounds there), the product in the accumulator's type A.
template <typename T, typename A>
MMLOSS_HD A normalize_grad_coef(T inv, A radial) {
  return inv < T(1.0 / kNormEps) ? A(inv) * A(inv) * radial : A(0);
}

// The same radial term coef · x_c for one entry x_c, as (inv · radial) · (inv · x_c): each
// factor stays in range for rows of any norm (inv² alone underflows fp32 for norms above ~1e19).
template <typename T, typename A>
MMLOSS_HD A normalize_grad_radial(T inv, A radial, A x) {
  return inv < T(1.0 / kNormEps) ? (A(inv) * radial) * (A(inv) * x) : A(0);
}

#ifdef MMLOSS_CPU_ISA
}  // namespace MMLOSS_CPU_ISA
#endif
}  // namespace mmloss
