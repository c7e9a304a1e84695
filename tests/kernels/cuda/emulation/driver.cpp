// C entry points (ctypes) onto the launchers of csrc/cuda/contrastive_cuda.h, run by the host
// emulation on host buffers; emulated.py mirrors the ATen glue around them.
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "contrastive_cuda.h"

using mmloss::cuda::DType;
using mmloss::cuda::GradArgs;
using mmloss::cuda::TileArgs;

namespace {
constexpr cudaStream_t kStream = nullptr;
}

extern "C" {

// TileArgs as contrastive_cuda.cpp's prepare() fills them (null teacher or group pointers: off).
TileArgs* emu_tile_args(int dtype, const void* query, const void* key, int64_t stride_q, int64_t stride_k, int64_t M,
                        int64_t N, int D, const float* inv_norm_q, const float* inv_norm_k, const int64_t* positives,
                        const int64_t* row_groups, const int64_t* key_groups, const float* margin_query,
                        const float* margin_key, int64_t stride_mq, int64_t stride_mk, int DT,
                        const float* filter_query, const float* filter_key, int64_t stride_fq, int64_t stride_fk,
                        int DF, double filter_threshold, double margin, const float* inv_temp) {
  TileArgs* a = new TileArgs{};
  a->dtype = DType(dtype);
  a->query = query;
  a->key = key;
  a->stride_q = stride_q;
  a->stride_k = stride_k;
  a->M = M;
  a->N = N;
  a->D = D;
  a->inv_norm_q = inv_norm_q;
  a->inv_norm_k = inv_norm_k;
  a->positives = positives;
  a->row_groups = row_groups;
  a->key_groups = key_groups;
  a->margin_query = margin_query;
  a->margin_key = margin_key;
  a->stride_mq = stride_mq;
  a->stride_mk = stride_mk;
  a->DT = DT;
  a->filter_query = filter_query;
  a->filter_key = filter_key;
  a->stride_fq = stride_fq;
  a->stride_fk = stride_fk;
  a->DF = DF;
  a->threshold = float(filter_threshold);
  a->margin = float(margin);
  a->cos_base = float(std::cos(margin));
  a->cos_m = float(std::cos(margin));
  a->sin_m = float(std::sin(margin));
  a->inv_temp = inv_temp;
  return a;
}

void emu_free_tile_args(TileArgs* a) { delete a; }

int emu_forward_splits(int64_t M, int64_t N, int sms) { return mmloss::cuda::forward_splits(M, N, sms); }

int emu_inv_norms(int dtype, const void* x, int64_t stride, int64_t rows, int D, float* out) {
  return mmloss::cuda::launch_inv_norms(DType(dtype), x, stride, rows, D, out, kStream);
}

int emu_forward(const TileArgs* a, int splits, float* partial, double* lse, float* pos_logit) {
  return mmloss::cuda::launch_forward(*a, splits, partial, lse, pos_logit, kStream);
}

int emu_grad_tile(const TileArgs* a, int64_t row0, int64_t row_end, int64_t col0, int64_t col_end, const float* lse,
                  const float* weight, const float* scale, void* h, int64_t stride_h, float* row_sum, float* row_temp,
                  float* col_sum) {
  const GradArgs g{row0, row_end, col0, col_end, lse, weight, scale, h, stride_h, row_sum, row_temp, col_sum};
  return mmloss::cuda::launch_grad_tile(*a, g, kStream);
}

int emu_finish(int dtype, int prod_fp32, const void* prod, int64_t stride_p, const void* x, int64_t stride_x,
               void* out, int64_t stride_o, const float* inv_norm, const float* radial, const float* scale,
               int64_t rows, int D) {
  return mmloss::cuda::launch_finish(DType(dtype), prod_fp32 != 0, prod, stride_p, x, stride_x, out, stride_o,
                                     inv_norm, radial, scale, rows, D, kStream);
}

const char* emu_error_string(int error) { return cudaGetErrorString(cudaError_t(error)); }

void emu_set_reverse_order(int reverse) { mmloss_emulation::set_reverse_order(reverse != 0); }

// x -> 16-bit (1 = bf16, 2 = fp16, as DType) -> float, by the emulation's conversions.
void emu_round_trip(int dtype, const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = dtype == int(DType::kBFloat16) ? __bfloat162float(__float2bfloat16_rn(x[i]))
                                            : __half2float(__float2half_rn(x[i]));
}

}  // extern "C"
