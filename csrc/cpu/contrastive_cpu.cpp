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
#include <tuple>
#include <vector>

#include "exp_simd.h"
#include "mmloss/tile_math.h"

namespace mmloss {
namespace {

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// 1 / max(‖x_i‖, ε) per row, in the compute dtype, converting a chunk of rows at a time.
at::Tensor inverse_norms(const at::Tensor& x, at::ScalarType type) {
  const int64_t rows = x.size(0), chunk = 4096;
  at::Tensor out = at::empty({rows}, x.options().dtype(type));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    at::Tensor norms = at::linalg_vector_norm(x.narrow(0, r0, n).to(type), 2, {1});
    out.narrow(0, r0, n).copy_(norms.clamp_min(kNormEps).reciprocal());
  }
  return out;
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
  const T* sim;            // (R, N) raw dot products <q_i, k_j>
  const T* teacher;        // (R, N) margin-teacher cosines, or null
  const T* filter;         // (R, N) filter scores, or null
  const T* inv_norm_q;     // (R,)
  const T* inv_norm_k;     // (N,)
  const int64_t* positives;   // (R,) column of the positive in this block (else outside [0, N))
  const int64_t* row_groups;  // (R,) or null
  const int64_t* key_groups;  // (N,) or null
  int64_t rows, cols;
  double inv_temp, margin;
  double cos_threshold;          // cos m: negatives with c < cos m are transformed
  double fixed_cos_m, fixed_sin_m; // cos m', sin m' of the fixed margin (m' = m)
  double threshold;              // the filter drops scores above it
  bool has_margin;
};

// Per-element math runs in double whatever T is: it costs little next to exp on a CPU, and it
// keeps fp32 runs' logits, probabilities and dL/d(1/τ) free of avoidable rounding.

// Per-thread row buffers, each of the block's N columns.
struct RowBuffers {
  explicit RowBuffers(int64_t n) : f(n), df(n), e(n) {}
  std::vector<double> f;   // transformed similarity; -inf = removed column, NaN = poisoned
  std::vector<double> df;  // df/dc
  std::vector<double> e;   // exp(logit - row max), or the probability when lse is given
};

constexpr double kRemoved = -INFINITY;

// f and df/dc of every column of row i (tile_math.h's evaluate). The features are template
// flags so that the column loop has no branches left and vectorises.
template <typename T, bool kGroups, bool kFilter, bool kAdaptive>
void row_values_with(const StripArgs<T>& a, int64_t i, double* f, double* df) {
  const int64_t cols = a.cols, pos = a.positives[i];
  const T* sim = a.sim + i * cols;
  const T* teacher = kAdaptive ? a.teacher + i * cols : nullptr;
  const T* filter = kFilter ? a.filter + i * cols : nullptr;
  const T* inv_k = a.inv_norm_k;
  const int64_t* key_groups = a.key_groups;
  const int64_t row_group = kGroups ? a.row_groups[i] : 0;
  const double inv_q = a.inv_norm_q[i];
  const MarginPair<double> fixed{a.cos_threshold, a.fixed_cos_m, a.fixed_sin_m};
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
        kAdaptive ? adaptive_margin(a.cos_threshold, a.margin, double(teacher[j])) : fixed;
    const Element<double> el = evaluate(c, pos == j, removed, poisoned, a.has_margin, margin, 1.0);
    f[j] = masked_logit(el);  // the logit with scale 1: f, -inf when removed, NaN when poisoned
    df[j] = el.df;
  }
}

// Fills f and df of row i; returns the row's largest f (ignoring NaN).
template <typename T>
double row_values(const StripArgs<T>& a, int64_t i, RowBuffers& buf) {
  double* f = buf.f.data();
  double* df = buf.df.data();
  const bool groups = a.key_groups != nullptr, filter = a.filter != nullptr, adaptive = a.teacher != nullptr;
  if (groups) {
    if (filter) {
      adaptive ? row_values_with<T, true, true, true>(a, i, f, df) : row_values_with<T, true, true, false>(a, i, f, df);
    } else {
      adaptive ? row_values_with<T, true, false, true>(a, i, f, df) : row_values_with<T, true, false, false>(a, i, f, df);
    }
  } else {
    if (filter) {
      adaptive ? row_values_with<T, false, true, true>(a, i, f, df) : row_values_with<T, false, true, false>(a, i, f, df);
    } else {
      adaptive ? row_values_with<T, false, false, true>(a, i, f, df) : row_values_with<T, false, false, false>(a, i, f, df);
    }
  }
  double f_max = kRemoved;
#pragma omp simd reduction(max : f_max)
  for (int64_t j = 0; j < a.cols; ++j) f_max = f[j] > f_max ? f[j] : f_max;
  return f_max;
}

// Columns of a symmetric loss (M == N, diagonal positives) that one row works with: in the
// forward it adds exp(logit_ij - shift) to col_acc (per thread, shift = 1/τ bounds every
// logit); in the backward it adds the column direction's term v_j (Q_ij - δ_ij), with
// Q_ij = exp(logit_ij - col_lse_j), to dL/dlogit_ij.
struct ColumnTerms {
  double shift = 0.0;
  double* col_acc = nullptr;          // (N,) forward
  const double* col_lse = nullptr;    // (N,) backward
  const double* col_weight = nullptr; // (N,) backward
};

// Row i of the core op, one exp per column (two for a symmetric loss). Without `given_lse`:
// computes the row's log-sum-exp over the block and its positive's logit (0 when not in the
// block). With `weight`: also overwrites row i of the similarity tile with H_ij = dL/dc_ij · a_i
// · b_j (a, b the inverse norms, dL the gradient of weight · loss_i, using `given_lse` when
// set, e.g. a global one) and returns row i's share of dL/d(1/τ).
template <typename T>
double process_row(const StripArgs<T>& a, int64_t i, RowBuffers& buf, const double* given_lse, double* lse,
                   double* pos_logit, const double* weight, T* tile, const ColumnTerms& col) {
  const double* f = buf.f.data();
  const double* df = buf.df.data();
  double* e = buf.e.data();
  const double s = a.inv_temp;
  const double f_max = row_values(a, i, buf);
  const int64_t pos = a.positives[i];
  const bool pos_here = pos >= 0 && pos < a.cols;
  // e_j = exp(logit_j - shift); P_j = e_j / total.
  double shift, total = 0.0;
  if (given_lse != nullptr) {
    shift = *given_lse;
    total = 1.0;
#pragma omp simd
    for (int64_t j = 0; j < a.cols; ++j) e[j] = exp_simd(f[j] * s - shift);
  } else {
    const double max_logit = f_max * s;
    shift = lse_shift(max_logit);
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < a.cols; ++j) {
      e[j] = exp_simd(f[j] * s - shift);  // removed columns: exp(-inf) = 0; NaN stays NaN
      total += e[j];
    }
    *lse = lse_value(LseAcc<double>{max_logit, total});
    *pos_logit = pos_here ? f[pos] * s : 0.0;
  }
  if (col.col_acc != nullptr) {
    double* acc = col.col_acc;
#pragma omp simd
    for (int64_t j = 0; j < a.cols; ++j) acc[j] += exp_simd(f[j] * s - col.shift);
  }
  if (weight == nullptr) return 0.0;
  T* h = tile + i * a.cols;
  const double w = *weight;
  if (w == 0.0 && col.col_lse == nullptr) {
    std::fill(h, h + a.cols, T(0));
    return 0.0;
  }
  const double w_over_total = w / total, inv_q = a.inv_norm_q[i];
  const T* inv_k = a.inv_norm_k;
  double d_inv_temp = 0.0;
  if (col.col_lse == nullptr) {
#pragma omp simd reduction(+ : d_inv_temp)
    for (int64_t j = 0; j < a.cols; ++j) {
      const double g = logit_grad(e[j], total, w_over_total, j == pos);
      d_inv_temp += inv_temp_grad(g, f[j], f[j] != kRemoved);
      h[j] = T(cosine_grad(g, df[j], s) * inv_q * inv_k[j]);
    }
  } else {
    const double* col_lse = col.col_lse;
    const double* v = col.col_weight;
#pragma omp simd reduction(+ : d_inv_temp)
    for (int64_t j = 0; j < a.cols; ++j) {
      const double g = logit_grad(e[j], total, w_over_total, j == pos) +
                       logit_grad(exp_simd(f[j] * s - col_lse[j]), 1.0, v[j], j == pos);
      d_inv_temp += inv_temp_grad(g, f[j], f[j] != kRemoved);
      h[j] = T(cosine_grad(g, df[j], s) * inv_q * inv_k[j]);
    }
  }
  return d_inv_temp;
}

struct Features {
  at::Tensor margin_q, margin_k, filter_q, filter_k, row_groups, key_groups;
};

template <typename T>
std::vector<at::Tensor> run(const at::Tensor& q, const at::Tensor& k, double inv_temp,
                            const at::Tensor& positives, double margin, const Features& feat,
                            double threshold, const c10::optional<at::Tensor>& lse_in,
                            const c10::optional<at::Tensor>& row_weight, int64_t strip_rows, bool symmetric,
                            const c10::optional<at::Tensor>& col_lse_in,
                            const c10::optional<at::Tensor>& col_weight_in) {
  const at::ScalarType type = compute_type(q);
  const int64_t M = q.size(0), N = k.size(0), d = q.size(1);
  const bool adaptive = feat.margin_q.defined(), filtering = feat.filter_q.defined();
  const bool want_grad = row_weight.has_value();
  const int64_t R = std::clamp<int64_t>(strip_rows, 1, M);
  // 16-bit keys are upcast one column chunk at a time; full-precision keys are used in place.
  const int64_t C = k.scalar_type() == type ? N : std::min<int64_t>(N, 4096);
  const auto opts = q.options().dtype(type);

  const at::Tensor inv_q = inverse_norms(q, type), inv_k = inverse_norms(k, type);
  const auto wide = q.options().dtype(at::kDouble);
  at::Tensor lse = lse_in.has_value() ? lse_in->to(at::kDouble).contiguous() : at::empty({M}, wide);
  at::Tensor pos_logit = at::zeros({M}, wide);
  at::Tensor weight = want_grad ? row_weight->to(at::kDouble).contiguous() : at::Tensor();
  at::Tensor dq, dk = want_grad ? at::zeros({N, d}, opts) : at::Tensor();
  if (want_grad) dq = at::empty({M, d}, opts);
  const at::Tensor mk = adaptive ? feat.margin_k.to(type) : at::Tensor();
  const at::Tensor fk = filtering ? feat.filter_k.to(type) : at::Tensor();
  at::Tensor sim = at::empty({R, N}, opts);
  at::Tensor teacher = adaptive ? at::empty({R, N}, opts) : at::Tensor();
  at::Tensor filter = filtering ? at::empty({R, N}, opts) : at::Tensor();
  const int threads = at::get_num_threads();
  double d_inv_temp = 0.0;
  // Symmetric: the forward sums each column per thread (threads × N), the backward reads the
  // column lse and weights.
  const bool col_sums = symmetric && !want_grad;
  at::Tensor col_acc = col_sums ? at::zeros({threads, N}, wide) : at::Tensor();
  at::Tensor col_lse = symmetric && want_grad ? col_lse_in->to(at::kDouble).contiguous() : at::Tensor();
  at::Tensor col_weight = symmetric && want_grad ? col_weight_in->to(at::kDouble).contiguous() : at::Tensor();

  StripArgs<T> a{};
  a.inv_norm_k = inv_k.data_ptr<T>();
  a.key_groups = feat.key_groups.defined() ? feat.key_groups.data_ptr<int64_t>() : nullptr;
  a.cols = N;
  a.inv_temp = inv_temp;
  a.margin = margin;
  a.cos_threshold = std::cos(margin);
  a.fixed_cos_m = std::cos(margin);
  a.fixed_sin_m = std::sin(margin);
  a.threshold = threshold;
  a.has_margin = margin > 0.0;

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t n = std::min(R, M - r0);
    const at::Tensor q_strip = rows_as(q, r0, n, type);
    at::Tensor s = sim.narrow(0, 0, n);
    for (int64_t c0 = 0; c0 < N; c0 += C) {
      const int64_t w = std::min(C, N - c0);
      at::Tensor block = s.narrow(1, c0, w);
      at::mm_out(block, q_strip, rows_as(k, c0, w, type).t());
    }
    at::Tensor teacher_strip = adaptive ? teacher.narrow(0, 0, n) : at::Tensor();
    at::Tensor filter_strip = filtering ? filter.narrow(0, 0, n) : at::Tensor();
    if (adaptive) at::mm_out(teacher_strip, rows_as(feat.margin_q, r0, n, type), mk.t());
    if (filtering) at::mm_out(filter_strip, rows_as(feat.filter_q, r0, n, type), fk.t());

    a.sim = s.data_ptr<T>();
    a.teacher = adaptive ? teacher.data_ptr<T>() : nullptr;
    a.filter = filtering ? filter.data_ptr<T>() : nullptr;
    a.inv_norm_q = inv_q.data_ptr<T>() + r0;
    a.positives = positives.data_ptr<int64_t>() + r0;
    a.row_groups = a.key_groups != nullptr ? feat.row_groups.data_ptr<int64_t>() + r0 : nullptr;
    a.rows = n;
    double* lse_strip = lse.data_ptr<double>() + r0;
    double* pos_strip = pos_logit.data_ptr<double>() + r0;
    const double* weight_strip = want_grad ? weight.data_ptr<double>() + r0 : nullptr;
    const bool need_lse = !lse_in.has_value();
    double strip_d_inv_temp = 0.0;

#pragma omp parallel num_threads(threads) reduction(+ : strip_d_inv_temp)
    {
      RowBuffers buf(N);
      ColumnTerms col;
      col.shift = inv_temp;
      if (col_sums) col.col_acc = col_acc.data_ptr<double>() + omp_get_thread_num() * N;
      if (col_lse.defined()) {
        col.col_lse = col_lse.data_ptr<double>();
        col.col_weight = col_weight.data_ptr<double>();
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        strip_d_inv_temp += process_row(a, i, buf, need_lse ? nullptr : lse_strip + i, lse_strip + i,
                                        pos_strip + i, want_grad ? weight_strip + i : nullptr, s.data_ptr<T>(), col);
      }
    }
    if (!want_grad) continue;
    d_inv_temp += strip_d_inv_temp;
    // U = H K (row i: a_i dL/dq̂_i), dK-accumulator += Hᵀ Q (row j: b_j dL/dk̂_j).
    at::Tensor U = dq.narrow(0, r0, n);
    for (int64_t c0 = 0; c0 < N; c0 += C) {
      const int64_t w = std::min(C, N - c0);
      const at::Tensor h = s.narrow(1, c0, w);
      if (c0 == 0) {
        at::mm_out(U, h, rows_as(k, c0, w, type));
      } else {
        U.addmm_(h, rows_as(k, c0, w, type));
      }
      dk.narrow(0, c0, w).addmm_(h.t(), q_strip);
    }
    normalize_backward_<T>(q_strip.contiguous(), inv_q.narrow(0, r0, n), U, threads);
  }
  if (col_sums) return {lse, pos_logit, col_acc.sum(0).log_().add_(inv_temp)};
  if (!want_grad) return {lse, pos_logit};
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    const int64_t n = std::min(C, N - r0);
    at::Tensor dk_rows = dk.narrow(0, r0, n);
    normalize_backward_<T>(rows_as(k, r0, n, type).contiguous(), inv_k.narrow(0, r0, n), dk_rows, threads);
  }
  return {lse, pos_logit, dq.to(q.scalar_type()), dk.to(k.scalar_type()), at::scalar_tensor(d_inv_temp, wide)};
}

// The vector `run` returns: {lse, pos_logit} (forward), {lse, pos_logit, lse_col} (symmetric
// forward), {lse, pos_logit, d_query, d_key, d_inv_temp} (with a row weight).
std::vector<at::Tensor> dispatch(const at::Tensor& query, const at::Tensor& key, double inv_temp,
                                 const Problem& problem, const c10::optional<at::Tensor>& lse,
                                 const c10::optional<at::Tensor>& row_weight, int64_t strip_rows, bool symmetric,
                                 const c10::optional<at::Tensor>& col_lse, const c10::optional<at::Tensor>& col_weight) {
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu(), "mmloss cpu backend: CPU tensors only");
  TORCH_CHECK(!symmetric || query.size(0) == key.size(0), "mmloss cpu backend: symmetric needs M == N");
  TORCH_CHECK(query.dim() == 2 && key.dim() == 2 && query.size(1) == key.size(1),
              "mmloss cpu backend: query (M, d) and key (N, d)");
  TORCH_CHECK(problem.positives.scalar_type() == at::kLong && problem.positives.dim() == 1 &&
                  problem.positives.size(0) == query.size(0),
              "mmloss cpu backend: positives must be int64 (M,)");
  // The ops are public (torch.ops.mmloss.*): every per-row and per-column input is checked.
  const int64_t M = query.size(0), N = key.size(0);
  auto check_rows = [](const c10::optional<at::Tensor>& t, int64_t rows, int64_t dim, const char* name) {
    TORCH_CHECK(!t.has_value() || (t->dim() == dim && t->size(0) == rows), "mmloss cpu backend: ", name,
                " must have ", dim, " dimension(s) and ", rows, " rows");
  };
  check_rows(problem.margin_query, M, 2, "margin_query");
  check_rows(problem.margin_key, N, 2, "margin_key");
  check_rows(problem.filter_query, M, 2, "filter_query");
  check_rows(problem.filter_key, N, 2, "filter_key");
  check_rows(problem.row_groups, M, 1, "row_groups");
  check_rows(problem.key_groups, N, 1, "key_groups");
  check_rows(lse, M, 1, "lse");
  check_rows(row_weight, M, 1, "row_weight");
  check_rows(col_lse, N, 1, "lse_col");
  check_rows(col_weight, N, 1, "col_weight");
  for (const auto& [rows, cols, name] : {std::make_tuple(&problem.margin_query, &problem.margin_key, "margin"),
                                         std::make_tuple(&problem.filter_query, &problem.filter_key, "filter")}) {
    TORCH_CHECK(rows->has_value() == cols->has_value() && (!rows->has_value() || (*rows)->size(1) == (*cols)->size(1)),
                "mmloss cpu backend: ", name, "_query (M, w) and ", name, "_key (N, w) come together and share w");
  }
  TORCH_CHECK(problem.row_groups.has_value() == problem.key_groups.has_value() &&
                  (!problem.key_groups.has_value() || (problem.row_groups->scalar_type() == at::kLong &&
                                                       problem.key_groups->scalar_type() == at::kLong)),
              "mmloss cpu backend: row_groups and key_groups come together, int64");
  Features feat;
  auto take = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  feat.margin_q = take(problem.margin_query);
  feat.margin_k = take(problem.margin_key);
  feat.filter_q = take(problem.filter_query);
  feat.filter_k = take(problem.filter_key);
  feat.row_groups = take(problem.row_groups);
  feat.key_groups = take(problem.key_groups);
  const at::Tensor q = query.contiguous(), k = key.contiguous(), pos = problem.positives.contiguous();
  if (compute_type(q) == at::kDouble) {
    return run<double>(q, k, inv_temp, pos, problem.margin, feat, problem.filter_threshold, lse, row_weight,
                       strip_rows, symmetric, col_lse, col_weight);
  }
  return run<float>(q, k, inv_temp, pos, problem.margin, feat, problem.filter_threshold, lse, row_weight, strip_rows,
                    symmetric, col_lse, col_weight);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                           double inv_temp, const Problem& problem,
                                                           int64_t strip_rows) {
  auto out = dispatch(query, key, inv_temp, problem, c10::nullopt, c10::nullopt, strip_rows, false, c10::nullopt,
                      c10::nullopt);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_forward_with_grad_cpu(
    const at::Tensor& query, const at::Tensor& key, double inv_temp, const Problem& problem,
    const at::Tensor& row_weight, int64_t strip_rows) {
  auto out = dispatch(query, key, inv_temp, problem, c10::nullopt, row_weight, strip_rows, false, c10::nullopt,
                      c10::nullopt);
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cpu(const at::Tensor& query,
                                                                        const at::Tensor& key, double inv_temp,
                                                                        const Problem& problem, const at::Tensor& lse,
                                                                        const at::Tensor& row_weight,
                                                                        int64_t strip_rows) {
  auto out = dispatch(query, key, inv_temp, problem, lse, row_weight, strip_rows, false, c10::nullopt, c10::nullopt);
  return {out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_symmetric_cpu(const at::Tensor& query,
                                                                                 const at::Tensor& key,
                                                                                 double inv_temp,
                                                                                 const Problem& problem,
                                                                                 int64_t strip_rows) {
  auto out = dispatch(query, key, inv_temp, problem, c10::nullopt, c10::nullopt, strip_rows, true, c10::nullopt,
                      c10::nullopt);
  return {out[0], out[2], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_symmetric_cpu(
    const at::Tensor& query, const at::Tensor& key, double inv_temp, const Problem& problem, const at::Tensor& lse,
    const at::Tensor& lse_col, const at::Tensor& row_weight, const at::Tensor& col_weight, int64_t strip_rows) {
  auto out = dispatch(query, key, inv_temp, problem, lse, row_weight, strip_rows, true, lse_col, col_weight);
  return {out[2], out[3], out[4]};
}

int openmp_threads() { return omp_get_max_threads(); }

}  // namespace mmloss
