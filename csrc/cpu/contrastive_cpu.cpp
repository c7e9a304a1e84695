// Tiled CPU kernels of the core op: rows are processed in strips of R rows against all N
// columns of the key block; a strip's similarity tile (R × N, bounded by a scratch budget)
// comes from one BLAS GEMM, the per-element math runs in OpenMP over the strip's rows, and
// the backward contracts the strip's gradient tile with two more GEMMs. Nothing of size
// M × N is allocated. Normalisation is fused: only inverse row norms are kept.
#include "contrastive_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "exp_simd.h"
#include "row_norms.h"
#include "mmloss/tile_math.h"

namespace mmloss {
namespace {

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows [r0, r0 + n) of x in the compute dtype (a view when x already has it).
at::Tensor rows_as(const at::Tensor& x, int64_t r0, int64_t n, at::ScalarType type) {
  return x.narrow(0, r0, n).to(type);
}

// In place, row-wise: acc_i = inv_i · dL/dx̂_i (the GEMM result) becomes dL/dx_i for
// x̂ = x / max(‖x‖, ε), that is acc_i - inv_i² <x_i, acc_i> x_i where ‖x_i‖ > ε and acc_i
// unchanged otherwise. x and acc are contiguous (rows, d) in the compute dtype.
template <typename T>
void normalize_backward_(const at::Tensor& x, const at::Tensor& inv, at::Tensor& acc, int threads) {
  const int64_t rows = x.size(0), d = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* ip = inv.data_ptr<T>();
  T* ap = acc.data_ptr<T>();
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

template <typename T>
struct StripArgs {
  const T* sim;            // (rows, cols) raw dot products <q_i, k_j> of the tile
  const T* teacher;        // (rows, cols) margin-teacher cosines, or null
  const T* filter;         // (rows, cols) filter scores, or null
  const T* inv_norm_q;     // (rows,)
  const T* inv_norm_k;     // (cols,) of the tile's columns
  const int64_t* positives;   // (rows,) column of the positive in the block (else outside [0, N))
  const int64_t* row_groups;  // (rows,) or null
  const int64_t* key_groups;  // (cols,) of the tile's columns, or null
  int64_t rows, cols, col0;   // the tile: rows × cols from column col0 of the block
  double inv_temp, margin, cos_base, cos_margin, sin_margin, threshold;
  bool has_margin;
};

// Per-element math runs in double whatever T is: it costs little next to exp on a CPU, and it
// keeps fp32 runs' logits, probabilities and dL/d(1/τ) free of avoidable rounding.

// Per-thread row buffers, each of the tile's columns.
struct RowBuffers {
  explicit RowBuffers(int64_t n) : f(n), df(n), l(n), e(n) {}
  std::vector<double> f;   // transformed similarity
  std::vector<double> df;  // df/dc
  std::vector<double> l;   // logit f/τ, rounded once; -inf = removed column, NaN = poisoned
  std::vector<double> e;   // exp(logit - shift): see row_forward and row_backward
};

constexpr double kRemoved = -INFINITY;

inline double exp_scalar(double x) { return exp_simd(x); }

// f, df/dc and the logit of every column of row i (tile_math.h's evaluate). The features are
// template flags so that the column loop has no branches left and vectorises. The logit is
// stored, and every exp reads it: a product f · (1/τ) fused into the subtraction of a shift
// (an FMA) would leave that product's rounding error, huge for a tiny τ, in the exponent.
template <typename T, bool kGroups, bool kFilter, bool kAdaptive>
void row_values_with(const StripArgs<T>& a, int64_t i, double* f, double* df, double* l) {
  const int64_t cols = a.cols, pos = a.positives[i] - a.col0;
  const T* sim = a.sim + i * cols;
  const T* teacher = kAdaptive ? a.teacher + i * cols : nullptr;
  const T* filter = kFilter ? a.filter + i * cols : nullptr;
  const T* inv_k = a.inv_norm_k;
  const int64_t* key_groups = a.key_groups;
  const int64_t row_group = kGroups ? a.row_groups[i] : 0;
  const double inv_q = a.inv_norm_q[i];
  const MarginPair<double> fixed{a.cos_base, a.cos_margin, a.sin_margin};
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const double c = double(sim[j]) * inv_q * inv_k[j];
    bool removed = false, poisoned = false;
    if constexpr (kGroups) removed = group_removes(key_groups[j], row_group);
    if constexpr (kFilter) {
      const double s = filter[j];
      removed = removed || filter_removes(s, a.threshold);
      poisoned = filter_poisons(s);
    }
    const MarginPair<double> margin =
        kAdaptive ? adaptive_margin(a.cos_base, a.margin, double(teacher[j])) : fixed;
    const Element<double> el = evaluate(c, pos == j, removed, poisoned, a.has_margin, margin, a.inv_temp);
    f[j] = el.f;
    df[j] = el.df;
    l[j] = masked_logit(el);
  }
}

// Fills f, df and l of row i; returns the row's largest logit (ignoring NaN).
template <typename T>
double row_values(const StripArgs<T>& a, int64_t i, RowBuffers& buf) {
  double* f = buf.f.data();
  double* df = buf.df.data();
  double* l = buf.l.data();
  const bool groups = a.key_groups != nullptr, filter = a.filter != nullptr, adaptive = a.teacher != nullptr;
  if (groups) {
    if (filter) {
      adaptive ? row_values_with<T, true, true, true>(a, i, f, df, l) : row_values_with<T, true, true, false>(a, i, f, df, l);
    } else {
      adaptive ? row_values_with<T, true, false, true>(a, i, f, df, l) : row_values_with<T, true, false, false>(a, i, f, df, l);
    }
  } else {
    if (filter) {
      adaptive ? row_values_with<T, false, true, true>(a, i, f, df, l) : row_values_with<T, false, true, false>(a, i, f, df, l);
    } else {
      adaptive ? row_values_with<T, false, false, true>(a, i, f, df, l) : row_values_with<T, false, false, false>(a, i, f, df, l);
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
    const double x = exp_simd(-std::fabs(l - m));
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
  const double* l = buf.l.data();
  double* e = buf.e.data();
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
  const int64_t pos = a.positives[i] - a.col0;
  if (pos >= 0 && pos < a.cols) *pos_logit = l[pos];
  if (col != nullptr) add_to_columns(l, a.cols, *col);
}

// The symmetric backward's column direction for the tile's columns: it adds v_j (Q_ij - δ_ij),
// Q_ij = exp(logit_ij - col_lse_j), to dL/dlogit_ij.
struct ColumnTerms {
  const double* col_lse = nullptr;     // (cols,)
  const double* col_weight = nullptr;  // (cols,)
};

// Overwrites row i of the tile with H_ij = dL/dc_ij · a_i · b_j (a, b the inverse norms, dL the
// gradient of w · loss_i) from buf (f, df and e_j = exp(logit_j - shift) with `total` = Σ_j e_j
// over the whole row, so that P_j = e_j / total); returns row i's share of dL/d(1/τ).
template <typename T>
double row_grad(const StripArgs<T>& a, int64_t i, const RowBuffers& buf, double total, double w, T* tile,
                const ColumnTerms& col) {
  const double* f = buf.f.data();
  const double* df = buf.df.data();
  const double* l = buf.l.data();
  const double* e = buf.e.data();
  const double s = a.inv_temp;
  const int64_t pos = a.positives[i] - a.col0;
  T* h = tile + i * a.cols;
  const double w_over_total = w / total, inv_q = a.inv_norm_q[i];
  const T* inv_k = a.inv_norm_k;
  double d_inv_temp = 0.0;
  if (col.col_lse == nullptr) {
#pragma omp simd reduction(+ : d_inv_temp)
    for (int64_t j = 0; j < a.cols; ++j) {
      const double g = logit_grad(e[j], total, w_over_total, j == pos);
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
    std::fill(tile + i * a.cols, tile + (i + 1) * a.cols, T(0));
    return 0.0;
  }
  row_values(a, i, buf);
  const double* l = buf.l.data();
  double* e = buf.e.data();
#pragma omp simd
  for (int64_t j = 0; j < a.cols; ++j) e[j] = exp_simd(l[j] - lse);
  return row_grad(a, i, buf, 1.0, w, tile, col);
}

// The forward of one tile for its rows: updates their running log-sum-exp (row_acc) and
// positive logits; symmetric (col_max, col_sum of threads × cols given): each thread's column
// accumulators of the tile, reset first. With `weight` (only when the tile spans every column):
// also the gradient tile H of Σ_i weight_i loss_i into `h`; returns its dL/d(1/τ).
template <typename T>
double tile_forward(const StripArgs<T>& a, LseAcc<double>* row_acc, double* pos_logit, const double* weight, T* h,
                    double* col_max, double* col_sum, int threads) {
  if (col_max != nullptr) {
    std::fill(col_max, col_max + threads * a.cols, kRemoved);
    std::fill(col_sum, col_sum + threads * a.cols, 0.0);
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
      row_forward(a, i, buf, row_acc[i], pos_logit + i, col_max != nullptr ? &col : nullptr);
      if (weight != nullptr) {
        if (weight[i] == 0.0) {
          std::fill(h + i * a.cols, h + (i + 1) * a.cols, T(0));
        } else {
          d_inv_temp += row_grad(a, i, buf, row_acc[i].sum, weight[i], h, ColumnTerms{});
        }
      }
    }
  }
  return d_inv_temp;
}

// Merges the threads' column accumulators of a tile (threads × cols) into the block's running
// ones, max and sum (cols,).
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

// The gradient tile H of Σ_i weight_i loss_i for the tile's rows given their final lse (rows,)
// (symmetric: plus the column direction, col_lse and col_weight of the tile's columns); returns
// its dL/d(1/τ).
template <typename T>
double tile_backward(const StripArgs<T>& a, const double* lse, const double* weight, T* h, const ColumnTerms& col,
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

struct Features {
  at::Tensor margin_q, margin_k, filter_q, filter_k, row_groups, key_groups;
};

template <typename T>
std::vector<at::Tensor> run(const at::Tensor& q_in, const at::Tensor& k_in, double inv_temp,
                            const at::Tensor& positives, double margin, const Features& feat,
                            double threshold, const c10::optional<at::Tensor>& lse_in,
                            const c10::optional<at::Tensor>& row_weight, int64_t strip_rows, int64_t block_cols,
                            bool symmetric, const c10::optional<at::Tensor>& col_lse_in,
                            const c10::optional<at::Tensor>& col_weight_in) {
  const at::ScalarType type = compute_type(q_in);
  const int64_t M = q_in.size(0), N = k_in.size(0), d = q_in.size(1);
  // Norms in float64 without overflow; rows of norm above 2^40 scaled by a power of two (exact:
  // the cosines do not change) so that the GEMMs' raw products stay in range, and their
  // gradients scaled back at the end.
  const RowScaling rows_q = row_scaling(q_in, type), rows_k = row_scaling(k_in, type);
  const at::Tensor q = scaled_rows(q_in, rows_q, type), k = scaled_rows(k_in, rows_k, type);
  const at::Tensor &inv_q = rows_q.inv, &inv_k = rows_k.inv;
  const bool adaptive = feat.margin_q.defined(), filtering = feat.filter_q.defined();
  const bool want_grad = row_weight.has_value();
  const int64_t R = std::clamp<int64_t>(strip_rows, 1, std::max<int64_t>(M, 1));
  const int64_t C = block_cols > 0 ? std::min(block_cols, N) : N;
  // A tile spanning every column gives a row's final lse in the forward, so the gradient comes
  // in the same pass (3 GEMMs); narrower tiles take a second pass over the strip's tiles.
  const bool fused = want_grad && !lse_in.has_value() && C >= N;
  // 16-bit keys are upcast a column chunk at a time; full-precision keys are used in place.
  const int64_t chunk = k.scalar_type() == type ? std::max<int64_t>(C, 1) : std::min<int64_t>(std::max<int64_t>(C, 1), 4096);
  const auto opts = q.options().dtype(type);

  const auto wide = q.options().dtype(at::kDouble);
  at::Tensor lse = lse_in.has_value() ? lse_in->to(at::kDouble).contiguous() : at::empty({M}, wide);
  at::Tensor pos_logit = at::zeros({M}, wide);
  at::Tensor weight = want_grad ? row_weight->to(at::kDouble).contiguous() : at::Tensor();
  at::Tensor dq = want_grad ? at::zeros({M, d}, opts) : at::Tensor();
  at::Tensor dk = want_grad ? at::zeros({N, d}, opts) : at::Tensor();
  const at::Tensor mk = adaptive ? feat.margin_k.to(type) : at::Tensor();
  const at::Tensor fk = filtering ? feat.filter_k.to(type) : at::Tensor();
  at::Tensor sim = at::empty({R * C}, opts);
  at::Tensor teacher = adaptive ? at::empty({R * C}, opts) : at::Tensor();
  at::Tensor filter = filtering ? at::empty({R * C}, opts) : at::Tensor();
  const int threads = at::get_num_threads();
  double d_inv_temp = 0.0;
  // Symmetric: the forward keeps each column's running lse (N,), from per-thread accumulators
  // of a tile (threads × C) merged after each tile; the backward reads the column lse and weights.
  const bool col_sums = symmetric && !want_grad;
  at::Tensor col_max = col_sums ? at::full({N}, kRemoved, wide) : at::Tensor();
  at::Tensor col_sum = col_sums ? at::zeros({N}, wide) : at::Tensor();
  at::Tensor thread_cols = col_sums ? at::empty({2, threads, C}, wide) : at::Tensor();
  at::Tensor col_lse = symmetric && want_grad ? col_lse_in->to(at::kDouble).contiguous() : at::Tensor();
  at::Tensor col_weight = symmetric && want_grad ? col_weight_in->to(at::kDouble).contiguous() : at::Tensor();
  std::vector<LseAcc<double>> row_acc(R);

  StripArgs<T> a{};
  a.inv_temp = inv_temp;
  a.margin = margin;
  a.cos_base = std::cos(margin);
  a.cos_margin = std::cos(margin);
  a.sin_margin = std::sin(margin);
  a.threshold = threshold;
  a.has_margin = margin > 0.0;

  // The tiles of rows [r0, r0 + n) × columns [c0, c0 + w) (similarity and teachers) into the
  // scratch, and `a` pointed at them; returns the similarity tile (n, w).
  auto compute_tiles = [&](const at::Tensor& q_strip, int64_t r0, int64_t n, int64_t c0, int64_t w) {
    at::Tensor s = sim.narrow(0, 0, n * w).view({n, w});
    for (int64_t kc = 0; kc < w; kc += chunk) {
      const int64_t kw = std::min(chunk, w - kc);
      at::Tensor block = s.narrow(1, kc, kw);
      at::mm_out(block, q_strip, rows_as(k, c0 + kc, kw, type).t());
    }
    if (adaptive) {
      at::Tensor t = teacher.narrow(0, 0, n * w).view({n, w});
      at::mm_out(t, rows_as(feat.margin_q, r0, n, type), mk.narrow(0, c0, w).t());
    }
    if (filtering) {
      at::Tensor t = filter.narrow(0, 0, n * w).view({n, w});
      at::mm_out(t, rows_as(feat.filter_q, r0, n, type), fk.narrow(0, c0, w).t());
    }
    a.sim = s.data_ptr<T>();
    a.teacher = adaptive ? teacher.data_ptr<T>() : nullptr;
    a.filter = filtering ? filter.data_ptr<T>() : nullptr;
    a.inv_norm_k = inv_k.data_ptr<T>() + c0;
    a.key_groups = feat.key_groups.defined() ? feat.key_groups.data_ptr<int64_t>() + c0 : nullptr;
    a.cols = w;
    a.col0 = c0;
    return s;
  };
  // U (rows of dq) += H K and the dK accumulator += Hᵀ Q for the gradient tile h (n, w) of
  // columns [c0, c0 + w): row i of U is a_i dL/dq̂_i, row j of dK is b_j dL/dk̂_j.
  auto gradient_gemms = [&](const at::Tensor& h, at::Tensor& U, const at::Tensor& q_strip, int64_t c0, int64_t w) {
    for (int64_t kc = 0; kc < w; kc += chunk) {
      const int64_t kw = std::min(chunk, w - kc);
      const at::Tensor hk = h.narrow(1, kc, kw);
      U.addmm_(hk, rows_as(k, c0 + kc, kw, type));
      dk.narrow(0, c0 + kc, kw).addmm_(hk.t(), q_strip);
    }
  };

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t n = std::min(R, M - r0);
    const at::Tensor q_strip = rows_as(q, r0, n, type);
    a.inv_norm_q = inv_q.data_ptr<T>() + r0;
    a.positives = positives.data_ptr<int64_t>() + r0;
    a.row_groups = feat.key_groups.defined() ? feat.row_groups.data_ptr<int64_t>() + r0 : nullptr;
    a.rows = n;
    double* lse_strip = lse.data_ptr<double>() + r0;
    double* pos_strip = pos_logit.data_ptr<double>() + r0;
    const double* weight_strip = want_grad ? weight.data_ptr<double>() + r0 : nullptr;
    at::Tensor U = want_grad ? dq.narrow(0, r0, n) : at::Tensor();
    double strip_d_inv_temp = 0.0;

    if (!lse_in.has_value()) {
      std::fill(row_acc.begin(), row_acc.begin() + n, LseAcc<double>{kRemoved, 0.0});
      for (int64_t c0 = 0; c0 < N; c0 += C) {
        const int64_t w = std::min(C, N - c0);
        const at::Tensor s = compute_tiles(q_strip, r0, n, c0, w);
        double* tmax = col_sums ? thread_cols.data_ptr<double>() : nullptr;
        double* tsum = col_sums ? tmax + threads * w : nullptr;
        strip_d_inv_temp += tile_forward(a, row_acc.data(), pos_strip, fused ? weight_strip : nullptr, s.data_ptr<T>(),
                                         tmax, tsum, threads);
        if (col_sums) {
          merge_columns(tmax, tsum, threads, w, col_max.data_ptr<double>() + c0, col_sum.data_ptr<double>() + c0);
        }
        if (fused) gradient_gemms(s, U, q_strip, c0, w);
      }
      for (int64_t i = 0; i < n; ++i) lse_strip[i] = lse_value(row_acc[i]);
    }
    if (want_grad && !fused) {
      for (int64_t c0 = 0; c0 < N; c0 += C) {
        const int64_t w = std::min(C, N - c0);
        const at::Tensor s = compute_tiles(q_strip, r0, n, c0, w);
        ColumnTerms col;
        if (col_lse.defined()) {
          col.col_lse = col_lse.data_ptr<double>() + c0;
          col.col_weight = col_weight.data_ptr<double>() + c0;
        }
        strip_d_inv_temp += tile_backward(a, lse_strip, weight_strip, s.data_ptr<T>(), col, threads);
        gradient_gemms(s, U, q_strip, c0, w);
      }
    }
    if (!want_grad) continue;
    d_inv_temp += strip_d_inv_temp;
    normalize_backward_<T>(q_strip.contiguous(), inv_q.narrow(0, r0, n), U, threads);
  }
  if (col_sums) {
    at::Tensor lse_col = col_max.masked_fill(col_max == kRemoved, 0.0).add_(col_sum.log());
    return {lse, pos_logit, lse_col};
  }
  if (!want_grad) return {lse, pos_logit};
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t n = std::min(chunk, N - r0);
    at::Tensor dk_rows = dk.narrow(0, r0, n);
    normalize_backward_<T>(rows_as(k, r0, n, type).contiguous(), inv_k.narrow(0, r0, n), dk_rows, threads);
  }
  if (rows_q.scale.defined()) dq.mul_(rows_q.scale.to(type).unsqueeze(1));
  if (rows_k.scale.defined()) dk.mul_(rows_k.scale.to(type).unsqueeze(1));
  return {lse, pos_logit, dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), at::scalar_tensor(d_inv_temp, wide)};
}

}  // namespace

std::vector<at::Tensor> contrastive_cpu(const at::Tensor& query, const at::Tensor& key, double inv_temp,
                                        const at::Tensor& positives, double margin,
                                        const c10::optional<at::Tensor>& margin_query,
                                        const c10::optional<at::Tensor>& margin_key,
                                        const c10::optional<at::Tensor>& filter_query,
                                        const c10::optional<at::Tensor>& filter_key, double filter_threshold,
                                        const c10::optional<at::Tensor>& row_groups,
                                        const c10::optional<at::Tensor>& key_groups,
                                        const c10::optional<at::Tensor>& lse,
                                        const c10::optional<at::Tensor>& row_weight, int64_t strip_rows,
                                        bool symmetric, const c10::optional<at::Tensor>& col_lse,
                                        const c10::optional<at::Tensor>& col_weight, int64_t block_cols) {
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu(), "mmloss cpu backend: CPU tensors only");
  TORCH_CHECK(!symmetric || query.size(0) == key.size(0), "mmloss cpu backend: symmetric needs M == N");
  TORCH_CHECK(!symmetric || !row_weight.has_value() || (col_lse.has_value() && col_weight.has_value() &&
                                                        lse.has_value()),
              "mmloss cpu backend: the symmetric backward needs lse, col_lse and col_weight");
  TORCH_CHECK(query.dim() == 2 && key.dim() == 2 && query.size(1) == key.size(1),
              "mmloss cpu backend: query (M, d) and key (N, d)");
  TORCH_CHECK(positives.scalar_type() == at::kLong && positives.size(0) == query.size(0),
              "mmloss cpu backend: positives must be int64 (M,)");
  Features feat;
  auto take = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  feat.margin_q = take(margin_query);
  feat.margin_k = take(margin_key);
  feat.filter_q = take(filter_query);
  feat.filter_k = take(filter_key);
  feat.row_groups = take(row_groups);
  feat.key_groups = take(key_groups);
  const at::Tensor q = query.contiguous(), k = key.contiguous(), pos = positives.contiguous();
  if (compute_type(q) == at::kDouble) {
    return run<double>(q, k, inv_temp, pos, margin, feat, filter_threshold, lse, row_weight, strip_rows, block_cols,
                       symmetric, col_lse, col_weight);
  }
  return run<float>(q, k, inv_temp, pos, margin, feat, filter_threshold, lse, row_weight, strip_rows, block_cols,
                    symmetric, col_lse, col_weight);
}

int openmp_threads() { return omp_get_max_threads(); }

}  // namespace mmloss
