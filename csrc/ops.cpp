// The torch.library ops of mmloss._C: the kernel contract of one key block (docs/contract.md §1), one op
// per entry point with a fixed result. Every schema is `(query, key, inv_temp, <the problem's
// fields, mmloss/problem.h>, <the entry point's own inputs>, chunk_rows, chunk_cols)`. The CPU
// implementations (below) are the OpenMP kernels of cpu/contrastive_cpu.cpp; the CUDA ones
// (forward and backward) are registered in cuda/contrastive_cuda.cpp. Fake (meta)
// implementations for torch.compile live in mmloss/library.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/contrastive_cpu.h"
#include "mmloss/problem.h"

namespace {

using Tensor = at::Tensor;

// 1/τ: a one-element tensor (a device scalar on CUDA; read once here on the CPU).
double read_inv_temp(const Tensor& inv_temp) {
  TORCH_CHECK(inv_temp.numel() == 1, "mmloss cpu backend: inv_temp must hold one number");
  return inv_temp.item<double>();
}

// chunk_rows: rows per strip on the CPU, rows per scratch chunk of the CUDA backward (the CUDA
// forward needs no scratch and ignores it). chunk_cols: columns per tile of a CPU strip (0 = all
// N; the CUDA kernels tile their columns themselves and ignore it).
std::tuple<Tensor, Tensor> forward_cpu(const Tensor& query, const Tensor& key,
                                       const Tensor& inv_temp MMLOSS_PROBLEM_PARAMS, int64_t chunk_rows,
                                       int64_t chunk_cols) {
  return mmloss::contrastive_forward_cpu(query, key, read_inv_temp(inv_temp), MMLOSS_PROBLEM_FROM_PARAMS, chunk_rows,
                                         chunk_cols);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_with_grad_cpu(const Tensor& query, const Tensor& key,
                                                                         const Tensor& inv_temp MMLOSS_PROBLEM_PARAMS,
                                                                         const Tensor& row_weight, int64_t chunk_rows,
                                                                         int64_t chunk_cols) {
  return mmloss::contrastive_forward_with_grad_cpu(query, key, read_inv_temp(inv_temp), MMLOSS_PROBLEM_FROM_PARAMS,
                                                   row_weight, chunk_rows, chunk_cols);
}

// need_temp_grad = false: d_inv_temp is returned as 0 (the CUDA kernels skip its sums).
std::tuple<Tensor, Tensor, Tensor> without_temp_grad(std::tuple<Tensor, Tensor, Tensor> grads, bool need_temp_grad) {
  if (!need_temp_grad) std::get<2>(grads).zero_();
  return grads;
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& query, const Tensor& key,
                                                const Tensor& inv_temp MMLOSS_PROBLEM_PARAMS, const Tensor& lse,
                                                const Tensor& row_weight, bool need_temp_grad, int64_t chunk_rows,
                                                int64_t chunk_cols) {
  return without_temp_grad(mmloss::contrastive_backward_cpu(query, key, read_inv_temp(inv_temp),
                                                            MMLOSS_PROBLEM_FROM_PARAMS, lse, row_weight, chunk_rows,
                                                            chunk_cols),
                           need_temp_grad);
}

std::tuple<Tensor, Tensor, Tensor> forward_symmetric_cpu(const Tensor& query, const Tensor& key,
                                                         const Tensor& inv_temp MMLOSS_PROBLEM_PARAMS,
                                                         int64_t chunk_rows, int64_t chunk_cols) {
  return mmloss::contrastive_forward_symmetric_cpu(query, key, read_inv_temp(inv_temp), MMLOSS_PROBLEM_FROM_PARAMS,
                                                   chunk_rows, chunk_cols);
}

std::tuple<Tensor, Tensor, Tensor> backward_symmetric_cpu(const Tensor& query, const Tensor& key,
                                                          const Tensor& inv_temp MMLOSS_PROBLEM_PARAMS,
                                                          const Tensor& lse, const Tensor& lse_col,
                                                          const Tensor& row_weight, const Tensor& col_weight,
                                                          bool need_temp_grad, int64_t chunk_rows,
                                                          int64_t chunk_cols) {
  return without_temp_grad(
      mmloss::contrastive_backward_symmetric_cpu(query, key, read_inv_temp(inv_temp), MMLOSS_PROBLEM_FROM_PARAMS, lse,
                                                 lse_col, row_weight, col_weight, chunk_rows, chunk_cols),
      need_temp_grad);
}

#define MMLOSS_OP(name, inputs, outputs) \
  name "(Tensor query, Tensor key, Tensor inv_temp" MMLOSS_PROBLEM_SCHEMA inputs ", int chunk_rows, int chunk_cols) -> " outputs

}  // namespace

TORCH_LIBRARY(mmloss, m) {
  m.def(MMLOSS_OP("contrastive_forward", "", "(Tensor lse, Tensor pos_logit)"));
  m.def(MMLOSS_OP("contrastive_forward_with_grad", ", Tensor row_weight",
                  "(Tensor lse, Tensor pos_logit, Tensor d_query, Tensor d_key, Tensor d_inv_temp)"));
  m.def(MMLOSS_OP("contrastive_backward", ", Tensor lse, Tensor row_weight, bool need_temp_grad",
                  "(Tensor d_query, Tensor d_key, Tensor d_inv_temp)"));
  m.def(MMLOSS_OP("contrastive_forward_symmetric", "", "(Tensor lse, Tensor lse_col, Tensor pos_logit)"));
  m.def(MMLOSS_OP("contrastive_backward_symmetric", ", Tensor lse, Tensor lse_col, Tensor row_weight, Tensor col_weight, bool need_temp_grad",
                  "(Tensor d_query, Tensor d_key, Tensor d_inv_temp)"));
}

TORCH_LIBRARY_IMPL(mmloss, CPU, m) {
  m.impl("contrastive_forward", &forward_cpu);
  m.impl("contrastive_forward_with_grad", &forward_with_grad_cpu);
  m.impl("contrastive_backward", &backward_cpu);
  m.impl("contrastive_forward_symmetric", &forward_symmetric_cpu);
  m.impl("contrastive_backward_symmetric", &backward_symmetric_cpu);
}
