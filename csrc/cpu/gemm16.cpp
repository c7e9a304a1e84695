// bf16 GEMMs with fp32 accumulation and output (gemm16.h). ATen's cpublas::gemm with bf16
// inputs and fp32 output (MKL's gemm_bf16bf16f32 on this path) runs no faster than an fp32 GEMM
// on AMD CPUs with avx512_bf16, and ATen's bf16 matmul (oneDNN) rounds its output to bf16; the
// brgemm microkernel (oneDNN ukernel, avx512_bf16 or AMX) runs at the bf16 rate with fp32 output.
#include "gemm16.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace mmloss {
namespace {

// Blocks of the product per microkernel call: measured on 2 threads at N = 4,096, d = 768,
// 64 × 128 is within 3% of the best block for each of the three GEMMs of a strip.
constexpr int64_t kBlockRows = 64, kBlockCols = 128;

at::Tensor padded_to_even_cols(const at::Tensor& x) {
  return x.size(1) % 2 == 0 ? x : at::constant_pad_nd(x, {0, 1});
}

// One small product through the microkernel against its exact value (small integers are exact
// in bf16 and fp32), shaped like the kernels' use (several column blocks, ldb beyond a block,
// odd sizes): false when the microkernel throws (this CPU lacks it) or differs.
bool probe() {
  try {
    const int64_t m = 67, n = 301, k = 6;
    const at::Tensor a = at::arange(m * k, at::kFloat).remainder_(7).sub_(3).view({m, k});
    const at::Tensor b = at::arange(k * n, at::kFloat).remainder_(5).sub_(2).view({k, n});
    const at::Tensor a16 = a.to(at::kBFloat16), bv = vnni_of_rows(b.to(at::kBFloat16));
    at::Tensor c = at::full({m, n}, 1.0f);
    gemm_bf16(m, n, k, a16.data_ptr<c10::BFloat16>(), k, bv.data_ptr<c10::BFloat16>(), n, c.data_ptr<float>(), n,
              /*accumulate=*/true, 2);
    return at::equal(c, at::mm(a, b).add_(1.0f));
  } catch (const std::exception&) {
    return false;
  }
}

// x rounded to bf16, nearest even, NaN kept quiet (c10::BFloat16's rounding, written with
// plain integer operations so that the tile loop vectorises).
inline uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return x != x ? uint16_t(0x7fc0) : uint16_t(rounded);
}

}  // namespace

bool gemm16_enabled() {
  const char* env = std::getenv("MMLOSS_CPU_GEMM16");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  static const bool works = probe();
  return works;
}

const char* gemm16_path() { return gemm16_enabled() ? "brgemm-bf16" : "fp32"; }

at::Tensor vnni_of_rows(const at::Tensor& x) {
  const at::Tensor even = x.size(0) % 2 == 0 ? x : at::constant_pad_nd(x, {0, 0, 0, 1});
  const int64_t k = even.size(0), n = even.size(1);
  return even.view({k / 2, 2, n}).transpose(1, 2).contiguous();
}

at::Tensor vnni_of_transpose(const at::Tensor& x) {
  const at::Tensor even = padded_to_even_cols(x).contiguous();
  const int64_t n = even.size(0), k = even.size(1);
  return even.view({n, k / 2, 2}).transpose(0, 1).contiguous();
}

void gemm_bf16(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate, int threads) {
  const int64_t bm = (m + kBlockRows - 1) / kBlockRows, bn = (n + kBlockCols - 1) / kBlockCols;
  const int use = int(std::max<int64_t>(1, std::min<int64_t>(threads, bm * bn)));
#pragma omp parallel num_threads(use)
  {
#pragma omp for collapse(2) schedule(static)
    for (int64_t j = 0; j < bn; ++j) {
      for (int64_t i = 0; i < bm; ++i) {
        const int64_t r0 = i * kBlockRows, c0 = j * kBlockCols;
        const int64_t rows = std::min(kBlockRows, m - r0), cols = std::min(kBlockCols, n - c0);
        at::native::cpublas::brgemm(rows, cols, k, lda, ldb, ldc, accumulate, a + r0 * lda, b + 2 * c0,
                                    c + r0 * ldc + c0, /*is_vnni=*/true);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  }
}

void round_gradient_tile(const float* h, int64_t rows, int64_t cols, c10::BFloat16* g, c10::BFloat16* gv,
                         int threads) {
  static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t), "bf16 is 16 bits");
  const int64_t cols2 = cols + (cols & 1), pairs = (rows + 1) / 2;
  auto* out = reinterpret_cast<uint16_t*>(g);
  auto* out_pairs = reinterpret_cast<uint32_t*>(gv);  // one (row 2p, row 2p + 1) pair per column
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t i0 = 2 * p, i1 = 2 * p + 1;
    const bool second = i1 < rows;
    const float* h0 = h + i0 * cols;
    const float* h1 = second ? h + i1 * cols : h0;
    uint16_t* g0 = out + i0 * cols2;
    uint16_t* g1 = second ? out + i1 * cols2 : nullptr;
    uint32_t* v = out_pairs + p * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const uint16_t x0 = bf16_bits(h0[j]);
      g0[j] = x0;
      v[j] = uint32_t(x0);
    }
    if (second) {
      for (int64_t j = 0; j < cols; ++j) {
        const uint16_t x1 = bf16_bits(h1[j]);
        g1[j] = x1;
        v[j] |= uint32_t(x1) << 16;
      }
    }
    if (cols2 != cols) {
      g0[cols] = 0;
      if (second) g1[cols] = 0;
    }
  }
}

}  // namespace mmloss
