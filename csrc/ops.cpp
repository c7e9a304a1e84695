// The torch.library ops of mmloss._C: one key block of the core op (SPEC §1), forward and
// backward, with the same schema on every device. The CPU implementation (below) is the OpenMP
// kernel of cpu/contrastive_cpu.cpp; the CUDA one is registered in cuda/contrastive_cuda.cpp.
// Fake (meta) implementations for torch.compile live in mmloss/library.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/contrastive_cpu.h"

namespace {

// chunk_rows: rows per strip on the CPU, rows per scratch chunk of the CUDA backward (the CUDA
// forward needs no scratch and ignores it).
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& inv_temp, const at::Tensor& positives, double margin,
                                               const c10::optional<at::Tensor>& margin_query,
                                               const c10::optional<at::Tensor>& margin_key,
                                               const c10::optional<at::Tensor>& filter_query,
                                               const c10::optional<at::Tensor>& filter_key, double filter_threshold,
                                               const c10::optional<at::Tensor>& row_groups,
                                               const c10::optional<at::Tensor>& key_groups, int64_t chunk_rows) {
  TORCH_CHECK(inv_temp.numel() == 1, "mmloss cpu backend: inv_temp must hold one number");
  auto out = mmloss::contrastive_cpu(query, key, inv_temp.item<double>(), positives, margin, margin_query, margin_key,
                                     filter_query, filter_key, filter_threshold, row_groups, key_groups,
                                     c10::nullopt, c10::nullopt, chunk_rows);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& inv_temp, const at::Tensor& positives,
    double margin, const c10::optional<at::Tensor>& margin_query, const c10::optional<at::Tensor>& margin_key,
    const c10::optional<at::Tensor>& filter_query, const c10::optional<at::Tensor>& filter_key,
    double filter_threshold, const c10::optional<at::Tensor>& row_groups, const c10::optional<at::Tensor>& key_groups,
    const at::Tensor& lse, const at::Tensor& row_weight, bool need_temp_grad, int64_t chunk_rows) {
  TORCH_CHECK(inv_temp.numel() == 1, "mmloss cpu backend: inv_temp must hold one number");
  auto out = mmloss::contrastive_cpu(query, key, inv_temp.item<double>(), positives, margin, margin_query, margin_key,
                                     filter_query, filter_key, filter_threshold, row_groups, key_groups, lse,
                                     row_weight, chunk_rows);
  return {out[2], out[3], need_temp_grad ? out[4] : at::zeros_like(out[4])};
}

}  // namespace

TORCH_LIBRARY(mmloss, m) {
  m.def(
      "contrastive_forward(Tensor query, Tensor key, Tensor inv_temp, Tensor positives, float margin, "
      "Tensor? margin_query, Tensor? margin_key, Tensor? filter_query, Tensor? filter_key, float filter_threshold, "
      "Tensor? row_groups, Tensor? key_groups, int chunk_rows) -> (Tensor lse, Tensor pos_logit)");
  m.def(
      "contrastive_backward(Tensor query, Tensor key, Tensor inv_temp, Tensor positives, float margin, "
      "Tensor? margin_query, Tensor? margin_key, Tensor? filter_query, Tensor? filter_key, float filter_threshold, "
      "Tensor? row_groups, Tensor? key_groups, Tensor lse, Tensor row_weight, bool need_temp_grad, int chunk_rows) "
      "-> (Tensor d_query, Tensor d_key, Tensor d_inv_temp)");
}

TORCH_LIBRARY_IMPL(mmloss, CPU, m) {
  m.impl("contrastive_forward", &forward_cpu);
  m.impl("contrastive_backward", &backward_cpu);
}
