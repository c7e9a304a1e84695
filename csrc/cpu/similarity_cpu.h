// CPU kernels of mmloss.similarity and mmloss.topk_similarity (see similarity_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace mmloss {

// Writes out (M, N) = cosines â_i·b̂_j (raw dot products when !normalize) for a (M, d) and
// b (N, d): products in float32 (float64 for float64 inputs), then cast to out's dtype,
// `strip_rows` rows at a time when a cast is needed.
void similarity_cpu(const at::Tensor& a, const at::Tensor& b, bool normalize, const at::Tensor& out,
                    int64_t strip_rows);

// {scores (M, k_top), indices (M, k_top) int64}: the k_top largest cosines of each row of q
// against the rows of k, best first, ties to the lower column index. Tiles of strip_rows ×
// block_cols, each from one GEMM, merged into a per-row heap: never M × N.
std::vector<at::Tensor> topk_similarity_cpu(const at::Tensor& q, const at::Tensor& k, int64_t k_top,
                                            bool normalize, int64_t strip_rows, int64_t block_cols);

}  // namespace mmloss
