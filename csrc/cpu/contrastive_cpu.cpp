// Tiled CPU kernels of the core op: rows are processed in strips of R rows, each strip in
// column tiles of the key block (R × C, bounded by a scratch budget); a tile comes from one
// BLAS GEMM, the per-element math (strip_kernels.h, one variant per instruction set) runs in
// OpenMP over its rows, and the backward contracts the gradient tile with two more GEMMs.
// Nothing of size M × N is allocated. Normalisation is fused: only inverse row norms are kept.
// bf16 inputs take bf16 GEMMs with fp32 accumulation and output (gemm16.h) where this CPU has
// them: the keys packed once per call for both of their GEMMs, the gradient tile rounded to bf16.
#include "contrastive_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "gemm16.h"
#include "mmloss/tile_math.h"
#include "row_norms.h"
#include "strip_kernels.h"

namespace mmloss {
namespace {

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

constexpr double kRemoved = -INFINITY;

template <typename T>
const TileKernels<T>& tile_kernels();
template <>
const TileKernels<float>& tile_kernels<float>() {
  return strip_kernels().f32;
}
template <>
const TileKernels<double>& tile_kernels<double>() {
  return strip_kernels().f64;
}

// acc (rows, d) becomes dL/dx for the rows x (TileKernels::normalize_backward).
template <typename T>
void normalize_backward_(const at::Tensor& x, const at::Tensor& inv, at::Tensor& acc, int threads) {
  tile_kernels<T>().normalize_backward(x.data_ptr<T>(), inv.data_ptr<T>(), acc.data_ptr<T>(), x.size(0), x.size(1),
                                       threads);
}

// Rows [r0, r0 + n) of x in the compute dtype (a view when x already has it).
at::Tensor rows_as(const at::Tensor& x, int64_t r0, int64_t n, at::ScalarType type) {
  return x.narrow(0, r0, n).to(type);
}

struct Features {
  at::Tensor margin_q, margin_k, filter_q, filter_k, row_groups, key_groups;
  at::Tensor row_owners, key_owners;  // the hardness scope's owners (undefined for scope 0)
  at::Tensor positive_weights;        // (M,) float64, several positives per row
  double hardness = 0.0;              // α of the hardness penalty
  int64_t hardness_scope = 0;
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
  // bf16 query and keys: bf16 GEMMs (scaling by a power of two is exact in bf16 too).
  const bool g16 = type == at::kFloat && q_in.scalar_type() == at::kBFloat16 &&
                   k_in.scalar_type() == at::kBFloat16 && gemm16_enabled();
  const at::ScalarType scaled_type = g16 ? at::kBFloat16 : type;
  const at::Tensor q = scaled_rows(q_in, rows_q, scaled_type), k = scaled_rows(k_in, rows_k, scaled_type);
  const at::Tensor &inv_q = rows_q.inv, &inv_k = rows_k.inv;
  const bool adaptive = feat.margin_q.defined(), filtering = feat.filter_q.defined();
  const bool want_grad = row_weight.has_value();
  const int64_t R = std::clamp<int64_t>(strip_rows, 1, std::max<int64_t>(M, 1));
  // The 16-bit path reads the keys' row pairs from an even column: narrow tiles of even width.
  const int64_t C_given = block_cols > 0 ? std::min(block_cols, N) : N;
  const int64_t C = g16 && C_given < N ? std::max<int64_t>(C_given & ~int64_t(1), 2) : C_given;
  // A tile spanning every column gives a row's final lse in the forward, so the gradient comes
  // in the same pass (3 GEMMs); narrower tiles take a second pass over the strip's tiles.
  const bool fused = want_grad && !lse_in.has_value() && C >= N;
  // 16-bit keys are upcast a column chunk at a time; full-precision keys are used in place.
  const int64_t chunk = k.scalar_type() == type ? std::max<int64_t>(C, 1) : std::min<int64_t>(std::max<int64_t>(C, 1), 4096);
  const auto opts = q.options().dtype(type);
  // 16-bit path: the keys as right factors, Kᵀ for the similarity (d2 / 2, N, 2), K for dQ
  // (N2 / 2, d, 2) (d2, N2: d and N rounded up to even); dK accumulated transposed (d, N).
  const int64_t d2 = d + (d & 1);
  const at::Tensor keys_t = g16 ? vnni_of_transpose(k) : at::Tensor();
  const at::Tensor keys_rows = g16 && want_grad ? vnni_of_rows(k) : at::Tensor();
  const auto opts16 = q.options().dtype(at::kBFloat16);
  const int64_t C2 = C + (C & 1), R2 = R + (R & 1);
  at::Tensor grad16 = g16 && want_grad ? at::empty({R * C2}, opts16) : at::Tensor();
  at::Tensor grad16_pairs = g16 && want_grad ? at::empty({R2 * C}, opts16) : at::Tensor();

  const auto wide = q.options().dtype(at::kDouble);
  at::Tensor lse = lse_in.has_value() ? lse_in->to(at::kDouble).contiguous() : at::empty({M}, wide);
  at::Tensor pos_logit = at::zeros({M}, wide);
  at::Tensor weight = want_grad ? row_weight->to(at::kDouble).contiguous() : at::Tensor();
  at::Tensor dq = want_grad ? at::zeros({M, d}, opts) : at::Tensor();
  at::Tensor dk = !want_grad ? at::Tensor() : g16 ? at::zeros({d, N}, opts) : at::zeros({N, d}, opts);
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
  std::vector<double> row_max(R), row_sum(R);
  const TileKernels<T>& kernels = tile_kernels<T>();

  StripArgs<T> a{};
  a.inv_temp = inv_temp;
  a.margin = margin;
  a.cos_threshold = std::cos(margin);
  a.fixed_cos_m = std::cos(margin);
  a.fixed_sin_m = std::sin(margin);
  a.threshold = threshold;
  a.has_margin = margin > 0.0;
  a.hardness = feat.hardness;
  a.hardness_scope = feat.hardness_scope;

  // The 16-bit path's strip operands: the strip (n, d2) bf16 (zero column for odd d), and its
  // transpose (d, n2) (zero column for odd n) for dKᵀ += Qᵀ G.
  at::Tensor strip16, strip16_t;
  // The tiles of rows [r0, r0 + n) × columns [c0, c0 + w) (similarity and teachers) into the
  // scratch, and `a` pointed at them; returns the similarity tile (n, w).
  auto compute_tiles = [&](const at::Tensor& q_strip, int64_t r0, int64_t n, int64_t c0, int64_t w) {
    at::Tensor s = sim.narrow(0, 0, n * w).view({n, w});
    if (g16) {
      gemm_bf16(n, w, d2, strip16.data_ptr<c10::BFloat16>(), d2, keys_t.data_ptr<c10::BFloat16>() + 2 * c0, N,
                s.data_ptr<float>(), w, /*accumulate=*/false, threads);
    } else {
      for (int64_t kc = 0; kc < w; kc += chunk) {
        const int64_t kw = std::min(chunk, w - kc);
        at::Tensor block = s.narrow(1, kc, kw);
        at::mm_out(block, q_strip, rows_as(k, c0 + kc, kw, type).t());
      }
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
    a.key_owners = feat.key_owners.defined() ? feat.key_owners.data_ptr<int64_t>() + c0 : nullptr;
    a.cols = w;
    a.col0 = c0;
    return s;
  };
  // U (rows of dq) += H K and the dK accumulator += Hᵀ Q for the gradient tile h (n, w) of
  // columns [c0, c0 + w): row i of U is a_i dL/dq̂_i, row j of dK is b_j dL/dk̂_j.
  // 16-bit path: H rounded to bf16, U += H K and dKᵀ[:, c0 : c0 + w] += Qᵀ H.
  auto gradient_gemms = [&](const at::Tensor& h, at::Tensor& U, const at::Tensor& q_strip, int64_t c0, int64_t w) {
    if (g16) {
      const int64_t n = h.size(0), w2 = w + (w & 1), n2 = n + (n & 1);
      auto* g = grad16.data_ptr<c10::BFloat16>();
      auto* gv = grad16_pairs.data_ptr<c10::BFloat16>();
      round_gradient_tile(h.data_ptr<float>(), n, w, g, gv, threads);
      gemm_bf16(n, d, w2, g, w2, keys_rows.data_ptr<c10::BFloat16>() + c0 * d, d, U.data_ptr<float>(), d,
                /*accumulate=*/true, threads);
      gemm_bf16(d, w, n2, strip16_t.data_ptr<c10::BFloat16>(), n2, gv, w, dk.data_ptr<float>() + c0, N,
                /*accumulate=*/true, threads);
      return;
    }
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
    if (g16) {
      const at::Tensor rows16 = q.narrow(0, r0, n);
      strip16 = d2 == d ? rows16 : at::constant_pad_nd(rows16, {0, 1});
      if (want_grad) strip16_t = at::constant_pad_nd(rows16.t(), {0, n % 2}).contiguous();
    }
    a.inv_norm_q = inv_q.data_ptr<T>() + r0;
    a.positives = positives.data_ptr<int64_t>() + r0;
    a.row_groups = feat.key_groups.defined() ? feat.row_groups.data_ptr<int64_t>() + r0 : nullptr;
    a.row_owners = feat.row_owners.defined() ? feat.row_owners.data_ptr<int64_t>() + r0 : nullptr;
    a.positive_weights = feat.positive_weights.defined() ? feat.positive_weights.data_ptr<double>() + r0 : nullptr;
    a.rows = n;
    double* lse_strip = lse.data_ptr<double>() + r0;
    double* pos_strip = pos_logit.data_ptr<double>() + r0;
    const double* weight_strip = want_grad ? weight.data_ptr<double>() + r0 : nullptr;
    at::Tensor U = want_grad ? dq.narrow(0, r0, n) : at::Tensor();
    double strip_d_inv_temp = 0.0;

    if (!lse_in.has_value()) {
      std::fill(row_max.begin(), row_max.begin() + n, kRemoved);
      std::fill(row_sum.begin(), row_sum.begin() + n, 0.0);
      for (int64_t c0 = 0; c0 < N; c0 += C) {
        const int64_t w = std::min(C, N - c0);
        const at::Tensor s = compute_tiles(q_strip, r0, n, c0, w);
        double* tmax = col_sums ? thread_cols.data_ptr<double>() : nullptr;
        double* tsum = col_sums ? tmax + threads * w : nullptr;
        strip_d_inv_temp += kernels.forward(a, row_max.data(), row_sum.data(), pos_strip,
                                            fused ? weight_strip : nullptr, s.data_ptr<T>(), tmax, tsum, threads);
        if (col_sums) {
          strip_kernels().merge_columns(tmax, tsum, threads, w, col_max.data_ptr<double>() + c0,
                                        col_sum.data_ptr<double>() + c0);
        }
        if (fused) gradient_gemms(s, U, q_strip, c0, w);
      }
      for (int64_t i = 0; i < n; ++i) lse_strip[i] = lse_value(LseAcc<double>{row_max[i], row_sum[i]});
    }
    if (want_grad && !fused) {
      for (int64_t c0 = 0; c0 < N; c0 += C) {
        const int64_t w = std::min(C, N - c0);
        const at::Tensor s = compute_tiles(q_strip, r0, n, c0, w);
        ColumnTerms col{nullptr, nullptr};
        if (col_lse.defined()) {
          col.col_lse = col_lse.data_ptr<double>() + c0;
          col.col_weight = col_weight.data_ptr<double>() + c0;
        }
        strip_d_inv_temp += kernels.backward(a, lse_strip, weight_strip, s.data_ptr<T>(), col, threads);
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
  // 16-bit path: dKᵀ (d, N) back to rows 1,024 at a time, finished straight into the bf16 result.
  at::Tensor dk_out = g16 ? at::empty({N, d}, k_in.options()) : at::Tensor();
  const int64_t finish_rows = g16 ? std::min<int64_t>(chunk, 1024) : chunk;
  for (int64_t r0 = 0; r0 < N; r0 += finish_rows) {
    const int64_t n = std::min(finish_rows, N - r0);
    at::Tensor dk_rows = g16 ? dk.narrow(1, r0, n).t().contiguous() : dk.narrow(0, r0, n);
    normalize_backward_<T>(rows_as(k, r0, n, type).contiguous(), inv_k.narrow(0, r0, n), dk_rows, threads);
    if (!g16) continue;
    if (rows_k.scale.defined()) dk_rows.mul_(rows_k.scale.narrow(0, r0, n).to(type).unsqueeze(1));
    dk_out.narrow(0, r0, n).copy_(dk_rows);
  }
  if (rows_q.scale.defined()) dq.mul_(rows_q.scale.to(type).unsqueeze(1));
  if (g16) {
    dk = dk_out;
  } else if (rows_k.scale.defined()) {
    dk.mul_(rows_k.scale.to(type).unsqueeze(1));
  }
  return {lse, pos_logit, dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), at::scalar_tensor(d_inv_temp, wide)};
}

// The vector `run` returns: {lse, pos_logit} (forward), {lse, pos_logit, lse_col} (symmetric
// forward), {lse, pos_logit, d_query, d_key, d_inv_temp} (with a row weight).
std::vector<at::Tensor> dispatch(const at::Tensor& query, const at::Tensor& key, double inv_temp,
                                 const Problem& problem, const c10::optional<at::Tensor>& lse,
                                 const c10::optional<at::Tensor>& row_weight, int64_t strip_rows, int64_t block_cols,
                                 bool symmetric, const c10::optional<at::Tensor>& col_lse,
                                 const c10::optional<at::Tensor>& col_weight) {
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
  // The hardness penalty and several positives per row (docs/contract.md §3).
  TORCH_CHECK(std::isfinite(problem.hardness_strength) && problem.hardness_strength >= 0.0,
              "mmloss cpu backend: hardness_strength must be finite and >= 0, got ", problem.hardness_strength);
  TORCH_CHECK(problem.hardness_scope >= 0 && problem.hardness_scope <= 2,
              "mmloss cpu backend: hardness_scope must be 0 (all), 1 (others) or 2 (own), got ", problem.hardness_scope);
  const bool scoped = problem.hardness_strength > 0.0 && problem.hardness_scope != 0;
  check_rows(problem.row_owners, M, 1, "row_owners");
  check_rows(problem.key_owners, N, 1, "key_owners");
  TORCH_CHECK(!scoped || (problem.row_owners.has_value() && problem.key_owners.has_value() &&
                          problem.row_owners->scalar_type() == at::kLong &&
                          problem.key_owners->scalar_type() == at::kLong),
              "mmloss cpu backend: hardness_scope ", problem.hardness_scope,
              " needs row_owners (M,) and key_owners (N,), int64");
  const bool multi = problem.positive_weights.has_value();
  check_rows(problem.positive_weights, M, 1, "positive_weights");
  TORCH_CHECK(!multi || (problem.positive_weights->scalar_type() == at::kDouble && problem.key_groups.has_value()),
              "mmloss cpu backend: positive_weights must be float64 (M,) and comes with row_groups and key_groups");
  TORCH_CHECK(!symmetric || (problem.hardness_strength == 0.0 && !multi),
              "mmloss cpu backend: the symmetric ops do not take the hardness penalty or several positives per row "
              "(run one direction at a time)");
  Features feat;
  auto take = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  feat.margin_q = take(problem.margin_query);
  feat.margin_k = take(problem.margin_key);
  feat.filter_q = take(problem.filter_query);
  feat.filter_k = take(problem.filter_key);
  feat.row_groups = take(problem.row_groups);
  feat.key_groups = take(problem.key_groups);
  if (scoped) {
    feat.row_owners = take(problem.row_owners);
    feat.key_owners = take(problem.key_owners);
  }
  feat.positive_weights = take(problem.positive_weights);
  feat.hardness = problem.hardness_strength;
  feat.hardness_scope = problem.hardness_scope;
  const at::Tensor q = query.contiguous(), k = key.contiguous(), pos = problem.positives.contiguous();
  if (compute_type(q) == at::kDouble) {
    return run<double>(q, k, inv_temp, pos, problem.margin, feat, problem.filter_threshold, lse, row_weight,
                       strip_rows, block_cols, symmetric, col_lse, col_weight);
  }
  return run<float>(q, k, inv_temp, pos, problem.margin, feat, problem.filter_threshold, lse, row_weight, strip_rows,
                    block_cols, symmetric, col_lse, col_weight);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                           double inv_temp, const Problem& problem,
                                                           int64_t strip_rows, int64_t block_cols) {
  auto out = dispatch(query, key, inv_temp, problem, c10::nullopt, c10::nullopt, strip_rows, block_cols, false,
                      c10::nullopt, c10::nullopt);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_forward_with_grad_cpu(
    const at::Tensor& query, const at::Tensor& key, double inv_temp, const Problem& problem,
    const at::Tensor& row_weight, int64_t strip_rows, int64_t block_cols) {
  auto out = dispatch(query, key, inv_temp, problem, c10::nullopt, row_weight, strip_rows, block_cols, false,
                      c10::nullopt, c10::nullopt);
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cpu(const at::Tensor& query,
                                                                        const at::Tensor& key, double inv_temp,
                                                                        const Problem& problem, const at::Tensor& lse,
                                                                        const at::Tensor& row_weight,
                                                                        int64_t strip_rows, int64_t block_cols) {
  auto out = dispatch(query, key, inv_temp, problem, lse, row_weight, strip_rows, block_cols, false, c10::nullopt,
                      c10::nullopt);
  return {out[2], out[3], out[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_symmetric_cpu(const at::Tensor& query,
                                                                                 const at::Tensor& key,
                                                                                 double inv_temp,
                                                                                 const Problem& problem,
                                                                                 int64_t strip_rows,
                                                                                 int64_t block_cols) {
  auto out = dispatch(query, key, inv_temp, problem, c10::nullopt, c10::nullopt, strip_rows, block_cols, true,
                      c10::nullopt, c10::nullopt);
  return {out[0], out[2], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_symmetric_cpu(
    const at::Tensor& query, const at::Tensor& key, double inv_temp, const Problem& problem, const at::Tensor& lse,
    const at::Tensor& lse_col, const at::Tensor& row_weight, const at::Tensor& col_weight, int64_t strip_rows,
    int64_t block_cols) {
  auto out = dispatch(query, key, inv_temp, problem, lse, row_weight, strip_rows, block_cols, true, lse_col, col_weight);
  return {out[2], out[3], out[4]};
}

int openmp_threads() { return omp_get_max_threads(); }

}  // namespace mmloss
