// The CPU kernels' hot loops (strip_kernels.h), compiled once per instruction set: the build
// defines MMLOSS_CPU_ISA (the variant's name, also its namespace) and its -m flags, and
// tile_math.h and exp_simd.h put their inline code in that namespace too, so that the linker
// never mixes code of two variants. No ATen here: plain pointers and OpenMP.
#include "strip_kernels.h"

#include <omp.h>

#include <cmath>

#include "exp_simd.h"
#include "mmloss/tile_math.h"

#ifndef MMLOSS_CPU_ISA
#error "strip_kernels.cpp is compiled with -DMMLOSS_CPU_ISA=<variant>"
#endif
#define MMLOSS_STRINGIFY_(x) #x
#define MMLOSS_STRINGIFY(x) MMLOSS_STRINGIFY_(x)

namespace mmloss {
namespace MMLOSS_CPU_ISA {
namespace {

// acc_i - inv_i² <x_i, acc_i> x_i where ‖x_i‖ > ε, acc_i unchanged otherwise.
template <typename T>
void normalize_backward(const T* xp, const T* ip, T* ap, int64_t rows, int64_t d, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = xp + i * d;
    T* ai = ap + i * d;
    double dot = 0.0;
    for (int64_t c = 0; c < d; ++c) dot += double(xi[c]) * ai[c];
    const T coef = T(normalize_grad_coef(ip[i], dot));
    if (coef == T(0)) continue;
    for (int64_t c = 0; c < d; ++c) ai[c] -= coef * xi[c];
  }
}

// Per-element math runs in double whatever T is: it costs little next to exp on a CPU, and it
// keeps fp32 runs' logits, probabilities and dL/d(1/τ) free of avoidable rounding.

// Per-thread row buffers, each of the tile's columns.
// (No std:: containers or algorithms in this file: their inline code would be shared by the
// variants at link time, whatever instruction set each was compiled for.)
struct RowBuffers {
  explicit RowBuffers(int64_t n)
      : data(new double[5 * n]), f(data), df(data + n), l(data + 2 * n), e(data + 3 * n), p(data + 4 * n) {}
  ~RowBuffers() { delete[] data; }
  RowBuffers(const RowBuffers&) = delete;
  RowBuffers& operator=(const RowBuffers&) = delete;
  double* data;
  double* f;   // transformed similarity
  double* df;  // df/dc
  double* l;   // logit f/τ, rounded once; -inf = removed column, NaN = poisoned
  double* e;   // exp(logit - shift): see row_forward and row_backward
  double* p;   // share of the positive term: 1 (the one positive), positive_weights_i (several), else 0
};

template <typename T>
void fill(T* p, int64_t n, T value) {
  for (int64_t j = 0; j < n; ++j) p[j] = value;
}

constexpr double kRemoved = -INFINITY;

inline double exp_scalar(double x) { return exp_simd(x); }

// The hardness penalty's template flag: off, on every negative, or on a scope of owners.
enum Hardness { kNoHardness, kHardnessAll, kHardnessScoped };

// f, df/dc, the logit and the positive share of every column of row i (tile_math.h's
// evaluate). The features are template flags so that the column loop has no branches left and
// vectorises (several positives per row is a select inside kGroups). The logit is stored, and
// every exp reads it: a product f · (1/τ) fused into the subtraction of a shift (an FMA) would
// leave that product's rounding error, huge for a tiny τ, in the exponent.
template <typename T, bool kGroups, bool kFilter, bool kAdaptive, Hardness kHardness>
void row_values_with(const StripArgs<T>& a, int64_t i, double* f, double* df, double* l, double* p) {
  const int64_t cols = a.cols, pos = a.positives[i] - a.col0;
  const T* sim = a.sim + i * cols;
  const T* teacher = kAdaptive ? a.teacher + i * cols : nullptr;
  const T* filter = kFilter ? a.filter + i * cols : nullptr;
  const T* inv_k = a.inv_norm_k;
  const int64_t* key_groups = a.key_groups;
  const int64_t row_group = kGroups ? a.row_groups[i] : 0;
  const int64_t* key_owners = a.key_owners;
  const int64_t row_owner = kHardness == kHardnessScoped ? a.row_owners[i] : 0;
  const int64_t scope = a.hardness_scope;
  const double alpha = a.hardness;
  const bool multi = a.positive_weights != nullptr;
  const double share = multi ? a.positive_weights[i] : 1.0;
  const double inv_q = a.inv_norm_q[i];
  const MarginPair<double> fixed{a.cos_threshold, a.fixed_cos_m, a.fixed_sin_m};
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const double c = double(sim[j]) * inv_q * inv_k[j];
    bool removed = false, poisoned = false, is_positive = pos == j;
    if constexpr (kGroups) {
      const bool same_group = group_removes(key_groups[j], row_group);
      is_positive = multi ? same_group : is_positive;
      removed = !multi && same_group;
    }
    if constexpr (kFilter) {
      const double s = filter[j];
      removed = removed || filter_removes(s, a.threshold);
      poisoned = filter_poisons(s);
    }
    const MarginPair<double> margin =
        kAdaptive ? adaptive_margin(a.cos_threshold, a.margin, double(teacher[j])) : fixed;
    Element<double> el = evaluate(c, is_positive, removed, poisoned, a.has_margin, margin, a.inv_temp);
    if constexpr (kHardness != kNoHardness) {
      bool penalised = !is_positive && !removed;
      if constexpr (kHardness == kHardnessScoped)
        penalised = penalised && hardness_penalises(scope, key_owners[j], row_owner);
      el.logit = hardness_logit(el.logit, c, alpha, penalised);
    }
    f[j] = el.f;
    df[j] = el.df;
    l[j] = masked_logit(el);
    p[j] = is_positive ? share : 0.0;
  }
}

// row_values_with for the hardness flag of `a`.
template <typename T, bool kGroups, bool kFilter, bool kAdaptive>
void row_values_hardness(const StripArgs<T>& a, int64_t i, double* f, double* df, double* l, double* p) {
  if (a.hardness == 0.0) {
    row_values_with<T, kGroups, kFilter, kAdaptive, kNoHardness>(a, i, f, df, l, p);
  } else if (a.key_owners == nullptr) {
    row_values_with<T, kGroups, kFilter, kAdaptive, kHardnessAll>(a, i, f, df, l, p);
  } else {
    row_values_with<T, kGroups, kFilter, kAdaptive, kHardnessScoped>(a, i, f, df, l, p);
  }
}

// Fills f, df, l and p of row i; returns the row's largest logit (ignoring NaN).
template <typename T>
double row_values(const StripArgs<T>& a, int64_t i, RowBuffers& buf) {
  double* f = buf.f;
  double* df = buf.df;
  double* l = buf.l;
  double* p = buf.p;
  const bool groups = a.key_groups != nullptr, filter = a.filter != nullptr, adaptive = a.teacher != nullptr;
  if (groups) {
    if (filter) {
      adaptive ? row_values_hardness<T, true, true, true>(a, i, f, df, l, p) : row_values_hardness<T, true, true, false>(a, i, f, df, l, p);
    } else {
      adaptive ? row_values_hardness<T, true, false, true>(a, i, f, df, l, p) : row_values_hardness<T, true, false, false>(a, i, f, df, l, p);
    }
  } else {
    if (filter) {
      adaptive ? row_values_hardness<T, false, true, true>(a, i, f, df, l, p) : row_values_hardness<T, false, true, false>(a, i, f, df, l, p);
    } else {
      adaptive ? row_values_hardness<T, false, false, true>(a, i, f, df, l, p) : row_values_hardness<T, false, false, false>(a, i, f, df, l, p);
    }
  }
  double l_max = kRemoved;
#pragma omp simd reduction(max : l_max)
  for (int64_t j = 0; j < a.cols; ++j) l_max = l[j] > l_max ? l[j] : l_max;
  return l_max;
}

// Column direction of a symmetric loss (M == N, diagonal positives) in the forward: one
// thread's running log-sum-exp {max, sum} of each of the tile's columns over its rows.
struct ColumnAcc {
  double* max;  // (cols,)
  double* sum;  // (cols,)
};

// Adds row i's logits l_j to the column accumulators, exact for every τ: with
// x = exp(-|l - max|), max' = max(max, l) and sum' = sum · x + 1 when l > max, else sum + x
// (one exp per element). Removed columns (l = -inf) add nothing; a NaN logit makes the sum NaN.
inline void add_to_columns(const double* logit, int64_t cols, const ColumnAcc& acc) {
  double* acc_max = acc.max;
  double* acc_sum = acc.sum;
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const double l = logit[j], m = acc_max[j], sum = acc_sum[j];
    const double x = exp_simd(-__builtin_fabs(l - m));
    const bool up = l > m;
    acc_sum[j] = l == kRemoved ? sum : (up ? sum * x + 1.0 : sum + x);
    acc_max[j] = up ? l : m;
  }
}

// Row i over the tile's columns, one exp per column (two for a symmetric loss): merges the
// tile's logits into the row's running log-sum-exp `acc` (the online update of tile_math.h),
// sets the positive's logit when the positive is in the tile, adds to the column accumulators
// when given, and leaves e_j = exp(logit_j - lse_shift(acc.max)) in buf.e.
template <typename T>
void row_forward(const StripArgs<T>& a, int64_t i, RowBuffers& buf, LseAcc<double>& acc, double* pos_logit,
                 const ColumnAcc* col) {
  const double* l = buf.l;
  double* e = buf.e;
  const double tile_max = row_values(a, i, buf);
  acc = lse_rescale(acc, tile_max > acc.max ? tile_max : acc.max, exp_scalar);
  const double shift = lse_shift(acc.max);
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < a.cols; ++j) {
    e[j] = exp_simd(l[j] - shift);  // removed columns: exp(-inf) = 0; NaN stays NaN
    total += e[j];
  }
  acc.sum += total;
  if (a.positive_weights != nullptr) {
    const double* p = buf.p;
    double tile_pos = 0.0;  // Σ_{j∈P_i} positive_weights_i·logit_ij over the tile (removed: p = 0)
#pragma omp simd reduction(+ : tile_pos)
    for (int64_t j = 0; j < a.cols; ++j) tile_pos += p[j] != 0.0 ? p[j] * l[j] : 0.0;
    *pos_logit += tile_pos;
  } else {
    const int64_t pos = a.positives[i] - a.col0;
    if (pos >= 0 && pos < a.cols) *pos_logit = l[pos];
  }
  if (col != nullptr) add_to_columns(l, a.cols, *col);
}

// Overwrites row i of the tile with H_ij = dL/dc_ij · a_i · b_j (a, b the inverse norms, dL the
// gradient of w · loss_i) from buf (f, df, p and e_j = exp(logit_j - shift) with `total` = Σ_j
// e_j over the whole row, so that P_j = e_j / total); returns row i's share of dL/d(1/τ).
template <typename T>
double row_grad(const StripArgs<T>& a, int64_t i, const RowBuffers& buf, double total, double w, T* tile,
                const ColumnTerms& col) {
  const double* f = buf.f;
  const double* df = buf.df;
  const double* l = buf.l;
  const double* e = buf.e;
  const double* p = buf.p;
  const double s = a.inv_temp;
  const int64_t pos = a.positives[i] - a.col0;
  T* h = tile + i * a.cols;
  const double w_over_total = w / total, inv_q = a.inv_norm_q[i];
  const T* inv_k = a.inv_norm_k;
  double d_inv_temp = 0.0;
  if (col.col_lse == nullptr) {
#pragma omp simd reduction(+ : d_inv_temp)
    for (int64_t j = 0; j < a.cols; ++j) {
      const double g = logit_grad_shared(e[j], total, w_over_total, p[j]);
      d_inv_temp += inv_temp_grad(g, f[j], l[j] != kRemoved);
      h[j] = T(cosine_grad(g, df[j], s) * inv_q * inv_k[j]);
    }
  } else {
    const double* col_lse = col.col_lse;
    const double* v = col.col_weight;
#pragma omp simd reduction(+ : d_inv_temp)
    for (int64_t j = 0; j < a.cols; ++j) {
      const double g = logit_grad(e[j], total, w_over_total, j == pos) +
                       logit_grad(exp_simd(l[j] - col_lse[j]), 1.0, v[j], j == pos);
      d_inv_temp += inv_temp_grad(g, f[j], l[j] != kRemoved);
      h[j] = T(cosine_grad(g, df[j], s) * inv_q * inv_k[j]);
    }
  }
  return d_inv_temp;
}

// Row i of the tile for the gradient of w · loss_i given its final log-sum-exp: H into the tile
// (zeros for a row of weight 0 without a column term); returns its share of dL/d(1/τ).
template <typename T>
double row_backward(const StripArgs<T>& a, int64_t i, RowBuffers& buf, double lse, double w, T* tile,
                    const ColumnTerms& col) {
  if (w == 0.0 && col.col_lse == nullptr) {
    fill(tile + i * a.cols, a.cols, T(0));
    return 0.0;
  }
  row_values(a, i, buf);
  const double* l = buf.l;
  double* e = buf.e;
#pragma omp simd
  for (int64_t j = 0; j < a.cols; ++j) e[j] = exp_simd(l[j] - lse);
  return row_grad(a, i, buf, 1.0, w, tile, col);
}

template <typename T>
double tile_forward(const StripArgs<T>& a, double* row_max, double* row_sum, double* pos_logit, const double* weight,
                    T* h, double* col_max, double* col_sum, int threads) {
  if (col_max != nullptr) {
    fill(col_max, threads * a.cols, kRemoved);
    fill(col_sum, threads * a.cols, 0.0);
  }
  double d_inv_temp = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : d_inv_temp)
  {
    RowBuffers buf(a.cols);
    const int t = omp_get_thread_num();
    const ColumnAcc col{col_max != nullptr ? col_max + t * a.cols : nullptr,
                        col_sum != nullptr ? col_sum + t * a.cols : nullptr};
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) {
      LseAcc<double> acc{row_max[i], row_sum[i]};
      row_forward(a, i, buf, acc, pos_logit + i, col_max != nullptr ? &col : nullptr);
      row_max[i] = acc.max;
      row_sum[i] = acc.sum;
      if (weight != nullptr) {
        if (weight[i] == 0.0) {
          fill(h + i * a.cols, a.cols, T(0));
        } else {
          d_inv_temp += row_grad(a, i, buf, acc.sum, weight[i], h, ColumnTerms{nullptr, nullptr});
        }
      }
    }
  }
  return d_inv_temp;
}

void merge_columns(const double* col_max, const double* col_sum, int threads, int64_t cols, double* max,
                   double* sum) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t j = 0; j < cols; ++j) {
    LseAcc<double> acc{max[j], sum[j]};
    for (int t = 0; t < threads; ++t)
      acc = lse_combine(acc, LseAcc<double>{col_max[t * cols + j], col_sum[t * cols + j]}, exp_scalar);
    max[j] = acc.max;
    sum[j] = acc.sum;
  }
}

template <typename T>
double tile_backward(const StripArgs<T>& a, const double* lse, const double* weight, T* h, ColumnTerms col,
                     int threads) {
  double d_inv_temp = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : d_inv_temp)
  {
    RowBuffers buf(a.cols);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) d_inv_temp += row_backward(a, i, buf, lse[i], weight[i], h, col);
  }
  return d_inv_temp;
}

}  // namespace

const StripKernels* kernels() {
  static const StripKernels table{MMLOSS_STRINGIFY(MMLOSS_CPU_ISA),
                                  {tile_forward<float>, tile_backward<float>, normalize_backward<float>},
                                  {tile_forward<double>, tile_backward<double>, normalize_backward<double>},
                                  merge_columns};
  return &table;
}

}  // namespace MMLOSS_CPU_ISA
}  // namespace mmloss
