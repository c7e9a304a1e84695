// bf16 GEMMs that accumulate and return fp32 on the CPU (gemm16.cpp), for the strip kernels of
// bf16 inputs: oneDNN's bf16 brgemm microkernel (ATen's at::native::cpublas::brgemm, one thread
// per call) over blocks of the product, the blocks spread over OpenMP threads. Its right factor
// B (k, n) comes in VNNI layout: (k / 2, n, 2), rows 2p and 2p + 1 interleaved, k even.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace mmloss {

// Whether bf16 inputs take the 16-bit GEMMs: MMLOSS_CPU_GEMM16 is not "0" (read at each call)
// and, checked once per process, this CPU runs the bf16 microkernel and a probe product came
// out exact. Otherwise bf16 keys are upcast to fp32 a chunk at a time for fp32 GEMMs.
bool gemm16_enabled();

// "brgemm-bf16" when bf16 inputs take the 16-bit GEMMs, else "fp32" (the upcast path).
const char* gemm16_path();

// x (k, n) bf16 as the right factor B = x: (ceil(k / 2), n, 2), a zero row appended to odd k.
at::Tensor vnni_of_rows(const at::Tensor& x);

// x (n, k) bf16 as the right factor B = xᵀ: (ceil(k / 2), n, 2), a zero column of x appended to odd k.
at::Tensor vnni_of_transpose(const at::Tensor& x);

// c (m, n) fp32 (row stride ldc) = a · B, or += a · B when `accumulate`: a (m, k) bf16 row-major
// (row stride lda), b the VNNI layout of B (k, n) with `ldb` columns per row pair (ldb ≥ n), k
// even. Products and sums in fp32.
void gemm_bf16(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate, int threads);

// The fp32 gradient tile h (rows, cols) rounded to bf16 (nearest even) for both backward GEMMs:
// g (rows, cols2) row-major with cols2 = cols rounded up to even (a zero column appended), and
// gv, the VNNI layout of h ((rows2 / 2, cols, 2), a zero row appended to odd rows).
void round_gradient_tile(const float* h, int64_t rows, int64_t cols, c10::BFloat16* g, c10::BFloat16* gv,
                         int threads);

}  // namespace mmloss
