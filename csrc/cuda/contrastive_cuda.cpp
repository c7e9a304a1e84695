// ATen glue of the CUDA backend: argument checks, allocation, the backward's two GEMMs
// (at::mm, cuBLAS) and the launches of contrastive_forward.cu / contrastive_backward.cu on the
// current stream; registered as the CUDA implementation of the mmloss:: ops contrastive_forward
// and contrastive_backward (schemas in csrc/ops.cpp, the problem's fields in mmloss/problem.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "contrastive_cuda.h"
#include "mmloss/problem.h"
#include "mmloss/tile_math.h"

namespace mmloss {
namespace cuda {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mmloss cuda backend: ", what, " failed: ", cudaGetErrorString(err));
}

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "mmloss cuda backend: query dtype ", x.scalar_type(),
                         " is not supported (float32, bfloat16, float16)");
  }
  return DType::kFloat32;
}

// Unit stride along the feature dimension (the kernels' only layout requirement).
at::Tensor rows_of(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

void check_rows(const c10::optional<at::Tensor>& x, const char* name, int64_t rows, const at::Device& device) {
  if (!x.has_value()) return;
  TORCH_CHECK(x->device() == device, "mmloss cuda backend: ", name, " is on ", x->device(), ", query on ", device);
  TORCH_CHECK(x->size(0) == rows, "mmloss cuda backend: ", name, " has ", x->size(0), " rows, expected ", rows);
}

// The kernels' arguments and the tensors they point into (kept alive by this struct). query and
// key are the rows the kernels see: scaled by scale_q / scale_k (row_scale) where defined.
struct Prepared {
  at::Tensor query, key, inv_q, inv_k, inv_temp, positives, row_groups, key_groups, mq, mk, fq, fk;
  at::Tensor scale_q, scale_k;
  TileArgs args{};
};

constexpr double kScaleAbove = 1099511627776.0;  // 2^40, as the CPU backend (csrc/cpu/row_norms.cpp)

// Per row (rows,) fp32: 2^-e with e = ⌊log2 ‖x_i‖⌋ (at most 126: a normal fp32/bf16 number) for
// rows of finite norm above 2^40, else 1; from the fp32 inverse norms, on the device (no host
// sync). Scaled rows keep their cosines exactly, and raw products of two rows stay far within
// fp32 in the tiles and the GEMMs.
at::Tensor row_scale(const at::Tensor& inv_norm) {
  const at::Tensor big = (inv_norm < float(1.0 / kScaleAbove)) & (inv_norm > 0);
  const at::Tensor e = at::floor(at::log2(inv_norm.to(at::kDouble)).neg_()).clamp_max_(126.0);
  return at::where(big, at::exp2(e.neg_()), at::ones_like(e)).to(at::kFloat);
}

// x (rows, d) with row i multiplied by scale_i (exact: powers of two), unit stride along d.
at::Tensor scaled(const at::Tensor& x, const at::Tensor& scale) {
  return (x * scale.to(x.scalar_type()).unsqueeze(1)).contiguous();
}

// A (rows (M, w), cols (N, w)) teacher pair as fp32 tensors kept in `keep_*` (16-bit values are
// exact in fp32; fp64 rounds as in the Triton backend), with the pointers, strides and width.
void bind_teachers(const at::Tensor& rows, const at::Tensor& cols, const char* name, at::Tensor& keep_rows,
                   at::Tensor& keep_cols, const float*& rows_ptr, const float*& cols_ptr, int64_t& stride_rows,
                   int64_t& stride_cols, int& width) {
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && rows.size(1) == cols.size(1), "mmloss cuda backend: ", name,
              "_query (M, w) and ", name, "_key (N, w) must share w");
  keep_rows = rows.to(at::kFloat).contiguous();
  keep_cols = cols.to(at::kFloat).contiguous();
  rows_ptr = keep_rows.data_ptr<float>();
  cols_ptr = keep_cols.data_ptr<float>();
  stride_rows = keep_rows.stride(0);
  stride_cols = keep_cols.stride(0);
  width = int(keep_rows.size(1));
}

Prepared prepare(const at::Tensor& query, const at::Tensor& key, const at::Tensor& inv_temp, const Problem& problem,
                 cudaStream_t stream) {
  TORCH_CHECK(query.is_cuda(), "mmloss cuda backend: query must be a CUDA tensor, got ", query.device());
  TORCH_CHECK(query.dim() == 2 && key.dim() == 2 && query.size(1) == key.size(1),
              "mmloss cuda backend: query (M, d) and key (N, d) must share d, got ", query.sizes(), " and ",
              key.sizes());
  TORCH_CHECK(key.device() == query.device(), "mmloss cuda backend: key is on ", key.device(), ", query on ",
              query.device());
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), "mmloss cuda backend: key dtype ", key.scalar_type(),
              " differs from query dtype ", query.scalar_type());
  TORCH_CHECK(query.size(1) < (int64_t(1) << 31), "mmloss cuda backend: d must be below 2^31");
  TORCH_CHECK(problem.positives.scalar_type() == at::kLong && problem.positives.dim() == 1,
              "mmloss cuda backend: positives must be int64 (M,)");
  TORCH_CHECK(inv_temp.numel() == 1, "mmloss cuda backend: inv_temp must hold one number");
  const int64_t M = query.size(0), N = key.size(0);
  const at::Device device = query.device();
  check_rows(problem.positives, "positives", M, device);
  check_rows(problem.margin_query, "margin_query", M, device);
  check_rows(problem.margin_key, "margin_key", N, device);
  check_rows(problem.filter_query, "filter_query", M, device);
  check_rows(problem.filter_key, "filter_key", N, device);
  check_rows(problem.row_groups, "row_groups", M, device);
  check_rows(problem.key_groups, "key_groups", N, device);
  TORCH_CHECK(problem.row_groups.has_value() == problem.key_groups.has_value(),
              "mmloss cuda backend: row_groups and key_groups come together");
  TORCH_CHECK(problem.margin_query.has_value() == problem.margin_key.has_value() &&
                  problem.filter_query.has_value() == problem.filter_key.has_value(),
              "mmloss cuda backend: teacher rows come in (query, key) pairs");

  Prepared p;
  p.query = rows_of(query);
  p.key = rows_of(key);
  const auto f32 = query.options().dtype(at::kFloat);
  p.inv_q = at::empty({M}, f32);
  p.inv_k = at::empty({N}, f32);
  const DType dtype = dtype_of(query);
  auto inv_norms = [&](const at::Tensor& x, at::Tensor& out, const char* what) {
    check_launch(launch_inv_norms(dtype, x.data_ptr(), x.stride(0), x.size(0), int(x.size(1)), out.data_ptr<float>(),
                                  stream),
                 what);
  };
  inv_norms(p.query, p.inv_q, "inv_norm_kernel (query)");
  inv_norms(p.key, p.inv_k, "inv_norm_kernel (key)");
  if (dtype != DType::kFloat16) {  // an fp16 row's norm stays below 65,504 · √d < 2^40
    p.scale_q = row_scale(p.inv_q);
    p.scale_k = row_scale(p.inv_k);
    p.query = scaled(p.query, p.scale_q);
    p.key = scaled(p.key, p.scale_k);
    inv_norms(p.query, p.inv_q, "inv_norm_kernel (scaled query)");
    inv_norms(p.key, p.inv_k, "inv_norm_kernel (scaled key)");
  }
  p.positives = problem.positives.contiguous();
  p.inv_temp = inv_temp.detach().to(device, at::kFloat).reshape({1}).contiguous();
  TileArgs& a = p.args;
  a.dtype = dtype;
  a.query = p.query.data_ptr();
  a.key = p.key.data_ptr();
  a.stride_q = p.query.stride(0);
  a.stride_k = p.key.stride(0);
  a.M = M;
  a.N = N;
  a.D = int(query.size(1));
  a.inv_norm_q = p.inv_q.data_ptr<float>();
  a.inv_norm_k = p.inv_k.data_ptr<float>();
  a.positives = p.positives.data_ptr<int64_t>();
  if (problem.key_groups.has_value()) {
    TORCH_CHECK(problem.row_groups->scalar_type() == at::kLong && problem.key_groups->scalar_type() == at::kLong,
                "mmloss cuda backend: row_groups and key_groups must be int64");
    p.row_groups = problem.row_groups->contiguous();
    p.key_groups = problem.key_groups->contiguous();
    a.row_groups = p.row_groups.data_ptr<int64_t>();
    a.key_groups = p.key_groups.data_ptr<int64_t>();
  }
  if (problem.margin > 0.0 && problem.margin_query.has_value())
    bind_teachers(*problem.margin_query, *problem.margin_key, "margin", p.mq, p.mk, a.margin_query, a.margin_key,
                  a.stride_mq, a.stride_mk, a.DT);
  if (problem.filter_query.has_value())
    bind_teachers(*problem.filter_query, *problem.filter_key, "filter", p.fq, p.fk, a.filter_query, a.filter_key,
                  a.stride_fq, a.stride_fk, a.DF);
  a.threshold = float(problem.filter_threshold);
  a.margin = float(problem.margin);
  a.cos_base = float(std::cos(problem.margin));  // the threshold cos m
  a.cos_m = float(std::cos(problem.margin));     // cos m' and sin m' of the fixed margin (m' = m)
  a.sin_m = float(std::sin(problem.margin));
  a.inv_temp = p.inv_temp.data_ptr<float>();
  return p;
}

// The gradients of the scaled rows back to the inputs' (x_i scaled by s_i: dL/dx_i = s_i dL/dx̃_i).
void unscale_grads(const Prepared& p, at::Tensor& d_query, at::Tensor& d_key) {
  if (p.scale_q.defined()) d_query.mul_(p.scale_q.to(d_query.scalar_type()).unsqueeze(1));
  if (p.scale_k.defined()) d_key.mul_(p.scale_k.to(d_key.scalar_type()).unsqueeze(1));
}

int multiprocessors(int device) {
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& inv_temp MMLOSS_PROBLEM_PARAMS,
                                                int64_t /*chunk_rows*/, int64_t /*chunk_cols*/) {
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.device().index()).stream();
  Prepared p = prepare(query, key, inv_temp, MMLOSS_PROBLEM_FROM_PARAMS, stream);
  const int64_t M = p.args.M;
  const auto f32 = query.options().dtype(at::kFloat);
  const int splits = forward_splits(M, p.args.N, multiprocessors(query.device().index()));
  at::Tensor partial = at::empty({3 * int64_t(splits) * M}, f32);
  at::Tensor lse = at::empty({M}, query.options().dtype(at::kDouble)), pos_logit = at::empty({M}, f32);
  check_launch(launch_forward(p.args, splits, partial.data_ptr<float>(), lse.data_ptr<double>(),
                              pos_logit.data_ptr<float>(), stream),
               "forward_kernel");
  return {lse, pos_logit};
}

// max over the inverse norms of rows with ‖x‖ > ε (a degenerate row's 1/ε would flush the
// fp16 scale of every other row to zero), as a 0-dim device tensor.
at::Tensor regular_max(const at::Tensor& inv_norm) {
  return at::where(inv_norm < float(1.0 / kNormEps), inv_norm, at::zeros_like(inv_norm)).amax();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                             const at::Tensor& inv_temp MMLOSS_PROBLEM_PARAMS,
                                                             const at::Tensor& lse, const at::Tensor& row_weight,
                                                             bool need_temp_grad, int64_t chunk_rows,
                                                             int64_t chunk_cols) {
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.device().index()).stream();
  Prepared p = prepare(query, key, inv_temp, MMLOSS_PROBLEM_FROM_PARAMS, stream);
  const int64_t M = p.args.M, N = p.args.N, D = p.args.D;
  TORCH_CHECK(lse.numel() == M && row_weight.numel() == M, "mmloss cuda backend: lse and row_weight must be (M,)");
  TORCH_CHECK(lse.device() == query.device() && row_weight.device() == query.device(),
              "mmloss cuda backend: lse and row_weight must be on the query's device");
  const auto f32 = query.options().dtype(at::kFloat);
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous(), weight = row_weight.to(at::kFloat).contiguous();
  // fp16: g = max|w| max(a) max(b) / τ bounds |H| = |G| a b / g by |f'|; bf16 and fp32 hold H as is.
  const at::Tensor scale = query.scalar_type() == at::kHalf
                               ? (weight.abs().amax() * regular_max(p.inv_q) * regular_max(p.inv_k) *
                                  p.inv_temp.abs().reshape({}))
                                     .clamp_min(1e-30)
                                     .reshape({1})
                               : at::ones({1}, f32);
  at::Tensor sums = at::zeros({2 * M + N}, f32);  // row_sum (M), row_temp (M), col_sum (N)
  float* row_sum = sums.data_ptr<float>();
  // Chunks of R rows × C columns (mmloss.cuda.chunk_shape: the R × C scratch within the budget);
  // C is N or a multiple of the column tile, so that no tile straddles two chunks.
  const int64_t R = std::clamp<int64_t>(chunk_rows, 1, std::max<int64_t>(M, 1));
  const int64_t C = chunk_cols > 0 && chunk_cols < N ? chunk_cols : std::max<int64_t>(N, 1);
  TORCH_CHECK(C >= N || C % kBlockN == 0, "mmloss cuda backend: chunk_cols must be N or a multiple of ", kBlockN,
              ", got ", chunk_cols);
  const bool row_chunks = R < M, col_chunks = C < N;
  at::Tensor scratch = at::empty({R, C}, query.options());
  at::Tensor d_query = at::empty({M, D}, query.options());
  at::Tensor d_key = at::empty({N, D}, key.options());
  // With several row chunks dK sums over them in fp32 (finished at the end); with one, each
  // column chunk's keys are final once their chunk is done. dQ_R likewise over column chunks.
  at::Tensor key_acc = row_chunks ? at::zeros({N, D}, f32) : at::Tensor();
  if (M == 0) d_key.zero_();  // no rows: nothing flows to the keys
  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t n = std::min(R, M - r0);
    const at::Tensor q_rows = p.query.narrow(0, r0, n);
    at::Tensor query_acc = col_chunks ? at::zeros({n, D}, f32) : at::Tensor();
    at::Tensor prod;
    for (int64_t c0 = 0; c0 == 0 || c0 < N; c0 += C) {  // once when N = 0: the rows' finish
      const int64_t w = std::min(C, N - c0);
      at::Tensor h = scratch.narrow(0, 0, n).narrow(1, 0, w);
      GradArgs g{r0, r0 + n, c0, c0 + w, lse32.data_ptr<float>(), weight.data_ptr<float>(), scale.data_ptr<float>(),
                 h.data_ptr(), h.stride(0), row_sum, need_temp_grad ? row_sum + M : nullptr, row_sum + 2 * M};
      check_launch(launch_grad_tile(p.args, g, stream), "grad_tile_kernel");
      const at::Tensor k_cols = p.key.narrow(0, c0, w);
      prod = at::mm(h, k_cols);
      if (query_acc.defined()) query_acc.add_(prod);
      const at::Tensor key_prod = at::mm(h.t(), q_rows);
      if (key_acc.defined()) {
        key_acc.narrow(0, c0, w).add_(key_prod);
      } else if (w > 0) {
        at::Tensor dk_cols = d_key.narrow(0, c0, w);
        check_launch(launch_finish(p.args.dtype, false, key_prod.data_ptr(), key_prod.stride(0), k_cols.data_ptr(),
                                   k_cols.stride(0), dk_cols.data_ptr(), dk_cols.stride(0),
                                   p.inv_k.data_ptr<float>() + c0, row_sum + 2 * M + c0, scale.data_ptr<float>(), w,
                                   int(D), stream),
                     "finish_kernel (key)");
      }
    }
    const at::Tensor q_total = query_acc.defined() ? query_acc : prod;
    at::Tensor dq_rows = d_query.narrow(0, r0, n);
    check_launch(launch_finish(p.args.dtype, query_acc.defined(), q_total.data_ptr(), q_total.stride(0),
                               q_rows.data_ptr(), q_rows.stride(0), dq_rows.data_ptr(), dq_rows.stride(0),
                               p.inv_q.data_ptr<float>() + r0, row_sum + r0, scale.data_ptr<float>(), n, int(D), stream),
                 "finish_kernel (query)");
  }
  if (key_acc.defined()) {
    check_launch(launch_finish(p.args.dtype, true, key_acc.data_ptr(), key_acc.stride(0), p.key.data_ptr(),
                               p.key.stride(0), d_key.data_ptr(), d_key.stride(0), p.inv_k.data_ptr<float>(),
                               row_sum + 2 * M, scale.data_ptr<float>(), N, int(D), stream),
                 "finish_kernel (key)");
  }
  unscale_grads(p, d_query, d_key);
  at::Tensor d_inv_temp = need_temp_grad ? sums.narrow(0, M, M).to(at::kDouble).sum()
                                         : at::zeros({}, query.options().dtype(at::kDouble));
  return {d_query, d_key, d_inv_temp};
}

}  // namespace
}  // namespace cuda
}  // namespace mmloss

TORCH_LIBRARY_IMPL(mmloss, CUDA, m) {
  m.impl("contrastive_forward", &mmloss::cuda::forward_cuda);
  m.impl("contrastive_backward", &mmloss::cuda::backward_cuda);
}
