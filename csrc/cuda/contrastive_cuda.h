// Launchers of the CUDA kernels of the core op (docs/contract.md §1). Raw pointers and element strides
// only, no ATen: the kernels compile with nvcc alone (CI's compile-only check); the ATen glue
// is contrastive_cuda.cpp. Every launcher returns cudaGetLastError() after its launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmloss {
namespace cuda {

// Element type of the embeddings (and of the backward's scratch H).
enum class DType { kFloat32, kBFloat16, kFloat16 };

// One key block: rows query (M, D) against columns key (N, D), strides in elements (row
// stride; unit stride along D). Teachers are fp32 with unit stride along their width.
struct TileArgs {
  DType dtype;
  const void* query;
  const void* key;
  int64_t stride_q, stride_k;
  int64_t M, N;
  int D;
  const float* inv_norm_q;   // (M,) a_i = 1 / max(‖q_i‖, ε)
  const float* inv_norm_k;   // (N,) b_j
  const int64_t* positives;  // (M,) column of the positive in this block; outside [0, N): absent
  const int64_t* row_groups; // (M,) group of the row's positive, or null (no group mask)
  const int64_t* key_groups; // (N,) or null
  const float* margin_query; // (M, DT) unit-norm margin teacher, or null (fixed margin)
  const float* margin_key;   // (N, DT)
  int64_t stride_mq, stride_mk;
  int DT;
  const float* filter_query; // (M, DF) filter teacher, or null (no filter)
  const float* filter_key;   // (N, DF)
  int64_t stride_fq, stride_fk;
  int DF;
  float threshold;           // the filter drops s_ij > threshold
  float margin;              // m (radians); 0 = plain InfoNCE
  float cos_base;            // cos m: negatives with c >= cos m keep f = c
  float cos_m, sin_m;        // of the fixed margin
  const float* inv_temp;     // device scalar 1/τ (no host sync: graph-capturable)
};

// The backward's tile pass over rows [row0, row_end) × columns [col0, col_end) (one chunk of
// the R × C scratch; col0 a multiple of kBlockN).
struct GradArgs {
  int64_t row0, row_end;
  int64_t col0, col_end;
  const float* lse;     // (M,) the (possibly global) log-sum-exp
  const float* weight;  // (M,) w_i: the incoming gradient of row i's loss (0 for ignored rows)
  const float* scale;   // device scalar g: H is stored divided by g (fp16 range), else 1
  void* h;              // (row_end - row0, col_end - col0) scratch in the embeddings' dtype
  int64_t stride_h;
  float* row_sum;       // (M,) += Σ_j G_ij c_ij, G = dL/dc (the normalisation's radial term)
  float* row_temp;      // (M,) += Σ_j dL/dlogit_ij f_ij (row i's share of dL/d(1/τ)), or null
  float* col_sum;       // (N,) += Σ_i G_ij c_ij
};

// Row/column tile of the forward and backward kernels (docs/cuda.md).
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

// Column splits of the forward: enough CTAs (rows blocks × splits) to fill `sms` twice.
int forward_splits(int64_t M, int64_t N, int sms);

// out_i = 1 / max(‖x_i‖, ε) in fp32 for `rows` rows of x (row stride `stride`).
cudaError_t launch_inv_norms(DType dtype, const void* x, int64_t stride, int64_t rows, int D, float* out,
                             cudaStream_t stream);

// lse (M,) float64 over the block's allowed columns (-inf if none; pos_logit + the row's loss
// when the positive is in the block, so that lse - pos_logit keeps the loss's relative accuracy)
// and pos_logit (M,) fp32 (0 if the positive is not in the block). `partial` is scratch of
// 3 · splits · M floats.
cudaError_t launch_forward(const TileArgs& args, int splits, float* partial, double* lse, float* pos_logit,
                           cudaStream_t stream);

// H_ij = a_i b_j G_ij / g into the scratch, and the row/column sums of GradArgs.
cudaError_t launch_grad_tile(const TileArgs& args, const GradArgs& grad, cudaStream_t stream);

// out_i = g · prod_i - coef_i x_i with coef_i = a_i² radial_i where ‖x_i‖ > ε (the gradient
// through x / max(‖x‖, ε)); prod is fp32 when prod_fp32, else of `dtype` like x and out.
cudaError_t launch_finish(DType dtype, bool prod_fp32, const void* prod, int64_t stride_p, const void* x,
                          int64_t stride_x, void* out, int64_t stride_o, const float* inv_norm, const float* radial,
                          const float* scale, int64_t rows, int D, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmloss
