// CPU kernels of the core op (see contrastive_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace mmloss {

// One key block of SPEC §1 on the CPU. Without `lse`, computes {lse, pos_logit} (M,) in float64; with
// `row_weight`, also {d_query, d_key, d_inv_temp} of Σ_i row_weight_i · loss_i, using the given
// `lse` when present (a global one) or the one it computed. Teacher rows arrive ready to use
// (unit-norm margin teacher; filter rows as the dot product should see them). Rows are
// processed `strip_rows` at a time, each strip in column tiles of `block_cols` columns (all N
// when 0), each tile with (1 + teachers) scratch tiles of strip_rows × block_cols.
// `symmetric` (M == N, diagonal positives): the forward also returns the column direction's
// lse (N,); the backward (row_weight, lse, col_lse and col_weight given) adds the column
// direction's gradient, Σ_j col_weight_j · column loss_j, in the same pass.
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
                                        bool symmetric = false,
                                        const c10::optional<at::Tensor>& col_lse = c10::nullopt,
                                        const c10::optional<at::Tensor>& col_weight = c10::nullopt,
                                        int64_t block_cols = 0);

// Threads OpenMP would use (0 when built without OpenMP).
int openmp_threads();

}  // namespace mmloss
