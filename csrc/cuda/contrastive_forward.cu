// Forward of the core op on CUDA: the inverse-norm prologue, the loss kernel (each CTA streams
// a range of 64-column tiles for 64 rows, keeping an online log-sum-exp per row), and the
// combine kernel that merges the column splits. See tile.cuh for the tile and docs/cuda.md.
#include <algorithm>

#include "tile.cuh"

namespace mmloss {
namespace cuda {
namespace {

constexpr int kNormWarps = 8;

// One warp per row: a_i = 1 / max(‖x_i‖, ε), float64 sums of squares: the squares of any
// fp32/16-bit row fit there (fp32 sums overflow from norms of about 1.8e19), and the norm kernel
// reads each row once, so its float64 FMAs cost nothing next to the loads.
template <typename T>
__global__ void __launch_bounds__(32 * kNormWarps)
    inv_norm_kernel(const T* __restrict__ x, int64_t stride, int64_t rows, int D, float* __restrict__ out) {
  const int64_t row = int64_t(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * stride;
  double sq = 0.0;
  for (int c = lane; c < D; c += 32) {
    const double v = to_float(xr[c]);
    sq = fma(v, v, sq);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  if (lane == 0) out[row] = float(1.0 / fmax(sqrt(sq), kNormEps));
}

// The positive's logit of a row when one of two disjoint column sets has it (-inf = absent;
// a NaN positive stays NaN, which fmaxf would drop).
__device__ __forceinline__ float merge_pos(float a, float b) { return a == -INFINITY ? b : a; }

// Partial results of column split blockIdx.y for rows [64 blockIdx.x, +64): per row the
// log-sum-exp accumulator {max over every column, sum over the columns other than the
// positive} and the positive's logit (-inf when not in the split), at partial[(3 split + k) M + i].
// Keeping the positive out of the sum lets the combine form the row's loss with log1p, so a
// nearly solved row (P_pos ~ 1) keeps its relative accuracy in fp32.
template <typename T, bool ADAPTIVE, bool FILTER>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const TileArgs p, int tiles_per_split, float* __restrict__ partial) {
  __shared__ __align__(16) unsigned char smem[kTileSmemBytes];
  __shared__ float reduced[2][3][kBlockM];  // [warp column][max, sum, pos][row]
  const int64_t row0 = int64_t(blockIdx.x) * kBlockM;
  const int64_t tiles = (p.N + kBlockN - 1) / kBlockN;
  const int64_t first = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t last = first + tiles_per_split < tiles ? first + tiles_per_split : tiles;
  const float inv_temp = *p.inv_temp;

  LseAcc<float> row_lse[MT][2];
  float row_pos[MT][2];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_lse[mi][h] = {-INFINITY, 0.f};
      row_pos[mi][h] = -INFINITY;
    }

  for (int64_t tile_n = first; tile_n < last; ++tile_n) {
    Tile<T, ADAPTIVE, FILTER> tile;
    tile.compute(p, row0, tile_n * kBlockN, smem);
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float logit[NT][2];
        bool positive[NT][2];
        float tile_max = -INFINITY;  // NaN logits never win: they reach the sum through exp
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            logit[ni][e] = tile.element(p, inv_temp, mi, ni, h, e, positive[ni][e]).logit;
            tile_max = logit[ni][e] > tile_max ? logit[ni][e] : tile_max;
            if (positive[ni][e]) row_pos[mi][h] = logit[ni][e];
          }
        // The online update: rescale to the new max, then add this tile's terms but the positive's.
        LseAcc<float>& acc = row_lse[mi][h];
        acc = lse_rescale(acc, acc.max > tile_max ? acc.max : tile_max, exp_f);
        const float shift = lse_shift(acc.max);
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) acc.sum += positive[ni][e] ? 0.f : exp_f(logit[ni][e] - shift);
      }
  }

  // Merge the four threads of a row (t = 0..3), then the two warps of a row.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      LseAcc<float>& acc = row_lse[mi][h];
#pragma unroll
      for (int off = 1; off < 4; off *= 2) {
        const LseAcc<float> other{__shfl_xor_sync(0xffffffffu, acc.max, off),
                                  __shfl_xor_sync(0xffffffffu, acc.sum, off)};
        acc = lse_combine(acc, other, exp_f);
        row_pos[mi][h] = merge_pos(row_pos[mi][h], __shfl_xor_sync(0xffffffffu, row_pos[mi][h], off));
      }
      if (lane % 4 == 0) {
        const int r = local_row(mi, h);
        reduced[warp % 2][0][r] = acc.max;
        reduced[warp % 2][1][r] = acc.sum;
        reduced[warp % 2][2][r] = row_pos[mi][h];
      }
    }
  __syncthreads();
  if (threadIdx.x < kBlockM && row0 + threadIdx.x < p.M) {
    const int r = threadIdx.x;
    const LseAcc<float> acc = lse_combine(LseAcc<float>{reduced[0][0][r], reduced[0][1][r]},
                                          LseAcc<float>{reduced[1][0][r], reduced[1][1][r]}, exp_f);
    const int64_t i = row0 + r, base = 3 * int64_t(blockIdx.y) * p.M;
    partial[base + i] = acc.max;
    partial[base + p.M + i] = acc.sum;
    partial[base + 2 * p.M + i] = merge_pos(reduced[0][2][r], reduced[1][2][r]);
  }
}

// lse_i (float64) and pos_logit_i from the splits' partial results, one thread per row. With the
// positive in the block (logit p, max m >= p, s the sum of exp(logit - m) over the other
// columns): lse = p + loss, loss = δ + log1p(expm1(-δ) + s) with δ = m - p, computed in fp32
// with fp32's relative accuracy (δ = 0 and loss = log1p(s) when the positive is the max), then
// added to p in float64 so that lse - pos_logit returns it; without it: m + log(s).
__global__ void combine_kernel(const float* __restrict__ partial, int splits, int64_t M, double* __restrict__ lse,
                               float* __restrict__ pos_logit) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  LseAcc<float> acc{-INFINITY, 0.f};
  float pos = -INFINITY;
  for (int s = 0; s < splits; ++s) {
    const int64_t base = 3 * int64_t(s) * M;
    acc = lse_combine(acc, LseAcc<float>{partial[base + i], partial[base + M + i]}, exp_f);
    pos = merge_pos(pos, partial[base + 2 * M + i]);
  }
  if (pos == -INFINITY) {  // the positive is in another block, or the row is ignored
    lse[i] = lse_value(acc);
    pos_logit[i] = 0.f;
    return;
  }
  const float delta = lse_shift(acc.max) - pos;
  const float loss = delta + log1pf(expm1f(-delta) + acc.sum);
  lse[i] = double(pos) + double(loss);
  pos_logit[i] = pos;
}

template <typename T, bool ADAPTIVE, bool FILTER>
void launch_forward_as(const TileArgs& p, int splits, float* partial, cudaStream_t stream) {
  const int64_t tiles = (p.N + kBlockN - 1) / kBlockN;
  const int tiles_per_split = int((tiles + splits - 1) / splits);
  const dim3 grid(unsigned((p.M + kBlockM - 1) / kBlockM), unsigned(splits));
  MMLOSS_LAUNCH(grid, kThreads, 0, stream, forward_kernel<T, ADAPTIVE, FILTER>)(p, tiles_per_split, partial);
}

template <typename T>
void launch_forward_typed(const TileArgs& p, int splits, float* partial, cudaStream_t stream) {
  const bool adaptive = p.margin_query != nullptr, filter = p.filter_query != nullptr;
  if (adaptive && filter) launch_forward_as<T, true, true>(p, splits, partial, stream);
  else if (adaptive) launch_forward_as<T, true, false>(p, splits, partial, stream);
  else if (filter) launch_forward_as<T, false, true>(p, splits, partial, stream);
  else launch_forward_as<T, false, false>(p, splits, partial, stream);
}

}  // namespace

int forward_splits(int64_t M, int64_t N, int sms) {
  const int64_t row_blocks = (M + kBlockM - 1) / kBlockM, tiles = (N + kBlockN - 1) / kBlockN;
  if (tiles == 0 || row_blocks == 0) return 1;
  const int64_t want = (2 * int64_t(sms) + row_blocks - 1) / row_blocks;
  const int64_t splits = std::max<int64_t>(1, std::min(want, tiles));
  const int64_t per_split = (tiles + splits - 1) / splits;
  return int((tiles + per_split - 1) / per_split);  // no empty split
}

cudaError_t launch_inv_norms(DType dtype, const void* x, int64_t stride, int64_t rows, int D, float* out,
                             cudaStream_t stream) {
  const unsigned blocks = unsigned((rows + kNormWarps - 1) / kNormWarps);
  if (blocks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      MMLOSS_LAUNCH(blocks, 32 * kNormWarps, 0, stream, inv_norm_kernel<float>)(static_cast<const float*>(x), stride,
                                                                                rows, D, out);
      break;
    case DType::kBFloat16:
      MMLOSS_LAUNCH(blocks, 32 * kNormWarps, 0, stream, inv_norm_kernel<__nv_bfloat16>)(
          static_cast<const __nv_bfloat16*>(x), stride, rows, D, out);
      break;
    case DType::kFloat16:
      MMLOSS_LAUNCH(blocks, 32 * kNormWarps, 0, stream, inv_norm_kernel<__half>)(static_cast<const __half*>(x), stride,
                                                                                 rows, D, out);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_forward(const TileArgs& p, int splits, float* partial, double* lse, float* pos_logit,
                           cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: launch_forward_typed<float>(p, splits, partial, stream); break;
    case DType::kBFloat16: launch_forward_typed<__nv_bfloat16>(p, splits, partial, stream); break;
    case DType::kFloat16: launch_forward_typed<__half>(p, splits, partial, stream); break;
  }
  const int threads = 256;
  MMLOSS_LAUNCH(unsigned((p.M + threads - 1) / threads), threads, 0, stream, combine_kernel)(partial, splits, p.M,
                                                                                             lse, pos_logit);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmloss
