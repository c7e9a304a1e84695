// CPU kernels of the core op (see contrastive_cpu.cpp): the five entry points of the kernel
// contract (mmloss.backends), each with a fixed result.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "mmloss/problem.h"

namespace mmloss {

// One key block of docs/contract.md §1 on the CPU. Teacher rows arrive ready to use (unit-norm margin
// teacher; filter rows as the dot product should see them). Rows are processed `strip_rows`
// at a time, each strip in column tiles of `block_cols` columns (all N when 0), each tile with
// (1 + teachers) scratch tiles of strip_rows × block_cols. lse and logits are float64;
// gradients have the inputs' dtypes; d_inv_temp is a 0-dim float64.

// (lse (M,), pos_logit (M,)).
std::tuple<at::Tensor, at::Tensor> contrastive_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                           double inv_temp, const Problem& problem,
                                                           int64_t strip_rows, int64_t block_cols);

// (lse, pos_logit, d_query, d_key, d_inv_temp) of Σ_i row_weight_i · loss_i in one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_forward_with_grad_cpu(
    const at::Tensor& query, const at::Tensor& key, double inv_temp, const Problem& problem,
    const at::Tensor& row_weight, int64_t strip_rows, int64_t block_cols);

// (d_query, d_key, d_inv_temp) of Σ_i row_weight_i · loss_i with P from the given (possibly
// global) lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cpu(const at::Tensor& query,
                                                                        const at::Tensor& key, double inv_temp,
                                                                        const Problem& problem, const at::Tensor& lse,
                                                                        const at::Tensor& row_weight,
                                                                        int64_t strip_rows, int64_t block_cols);

// Symmetric loss (M == N, diagonal positives): (lse (M,), lse_col (N,), pos_logit (M,)), the
// column direction's lse from the same strips.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_symmetric_cpu(const at::Tensor& query,
                                                                                 const at::Tensor& key,
                                                                                 double inv_temp,
                                                                                 const Problem& problem,
                                                                                 int64_t strip_rows,
                                                                                 int64_t block_cols);

// (d_query, d_key, d_inv_temp) of Σ_i row_weight_i · row_loss_i + Σ_j col_weight_j · col_loss_j.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_symmetric_cpu(
    const at::Tensor& query, const at::Tensor& key, double inv_temp, const Problem& problem, const at::Tensor& lse,
    const at::Tensor& lse_col, const at::Tensor& row_weight, const at::Tensor& col_weight, int64_t strip_rows,
    int64_t block_cols);

// Threads OpenMP would use (0 when built without OpenMP).
int openmp_threads();

}  // namespace mmloss
