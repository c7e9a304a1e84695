// Device side shared by the forward and backward kernels: operand tiles in shared memory, the
// 64 × 64 dot-product tile (mma.sync m16n8k16 on tensor cores for bf16/fp16, exact fp32 FMAs
// on CUDA cores for fp32 and for the teachers), and the per-element evaluation, which is
// tile_math.h's: only tiling and data movement live here.
//
// A CTA is 4 warps in a 2 × 2 grid, each warp owning 32 × 32 of the tile as MT × NT = 2 × 4
// mma tiles of 16 × 8. Thread (g = lane / 4, t = lane % 4) owns, in mma tile (mi, ni), rows
// g and g + 8 (h = 0, 1) and columns 2t and 2t + 1 (e = 0, 1): the accumulator layout of
// mma.m16n8k16. The fp32 FMA tile uses the same ownership, so the epilogues are shared.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "contrastive_cuda.h"
#include "mmloss/tile_math.h"

// kernel<<<grid, block, smem, stream>>>: the host emulation (tests/cuda_emulation) defines its own.
#ifndef MMLOSS_LAUNCH
#define MMLOSS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace mmloss {
namespace cuda {

constexpr int kThreads = 128;
constexpr int kWarpRows = 32, kWarpCols = 32;
constexpr int MT = 2, NT = 4;         // mma tiles per warp (rows, columns)
constexpr int kPerThread = MT * NT * 4;  // accumulator elements per thread (32: one bit each)
constexpr int kBlockK16 = 32;         // d-chunk of a 16-bit tile (two k16 steps)
constexpr int kLd16 = kBlockK16 + 8;  // its smem row, in elements: 80 bytes, conflict-free fragments
constexpr int kBlockK32 = 16;         // d-chunk of an fp32 tile
constexpr int kLd32 = kBlockK32 + 1;  // its smem row, in elements: odd, conflict-free columns
constexpr int kTileSmemBytes = 2 * kBlockM * kLd16 * 2 > 2 * kBlockM * kLd32 * 4 ? 2 * kBlockM * kLd16 * 2
                                                                              : 2 * kBlockM * kLd32 * 4;
static_assert(kBlockM == 2 * kWarpRows && kBlockN == 2 * kWarpCols && kWarpRows == 16 * MT && kWarpCols == 8 * NT,
              "tile shape");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float exp_f(float x) { return expf(x); }

// Local (row, column) in the CTA tile of this thread's element (mi, ni, h, e).
__device__ __forceinline__ int local_row(int mi, int h) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  return (warp / 2) * kWarpRows + mi * 16 + lane / 4 + 8 * h;
}
__device__ __forceinline__ int local_col(int ni, int e) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  return (warp % 2) * kWarpCols + ni * 8 + 2 * (lane % 4) + e;
}
__device__ __forceinline__ int bit_of(int mi, int ni, int h, int e) { return (mi * NT + ni) * 4 + 2 * h + e; }

// Rows [row0, row0 + 64) × d-chunk [k0, k0 + BK) of x (row stride `stride`, `rows` rows, width
// D) into dst (64 × LD), zero outside x. 16-byte loads where x allows them (`vec`).
template <typename T, int BK, int LD>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ x, int64_t stride, int64_t row0,
                                          int64_t rows, int k0, int D, bool vec) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {
    constexpr int kVecs = kBlockM * BK / V;
    for (int v = threadIdx.x; v < kVecs; v += kThreads) {
      const int r = v / (BK / V), kk = (v % (BK / V)) * V;
      const int64_t gr = row0 + r;
      const int gk = k0 + kk;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (gr < rows && gk < D) val = __ldg(reinterpret_cast<const uint4*>(x + gr * stride + gk));
      if constexpr (LD % V == 0) {
        *reinterpret_cast<uint4*>(dst + r * LD + kk) = val;
      } else {  // fp32 rows of odd length: four scalar stores
        float* d = reinterpret_cast<float*>(dst + r * LD + kk);
        d[0] = __uint_as_float(val.x);
        d[1] = __uint_as_float(val.y);
        d[2] = __uint_as_float(val.z);
        d[3] = __uint_as_float(val.w);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kBlockM * BK; idx += kThreads) {
      const int r = idx / BK, kk = idx % BK;
      const int64_t gr = row0 + r;
      const int gk = k0 + kk;
      dst[r * LD + kk] = (gr < rows && gk < D) ? x[gr * stride + gk] : from_float<T>(0.f);
    }
  }
}

template <typename T>
__device__ __forceinline__ bool vector_loads(const T* x, int64_t stride, int D) {
  constexpr int V = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && stride % V == 0 && D % V == 0;
}

// d += a · b for one m16n8k16 tile (fp32 accumulation).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MMLOSS_CUDA_HOST_EMULATION)  // tests/cuda_emulation: the instruction's semantics on the host
  mmloss_emulation::mma_m16n8k16<T>(d, a, b);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

__device__ __forceinline__ uint32_t pair_at(const void* smem, int elem) {
  return *reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(smem) + elem);
}

// acc = x[rows] · y[cols]^T for the CTA tile (rows from x_row0, columns from y_row0), over D.
// 16-bit T: tensor cores. fp32: CUDA-core FMAs (exact products, fp32 sums). Same d-order on
// every call, so the backward reproduces the forward's numbers bit for bit.
template <typename T>
__device__ __forceinline__ void dot_tile(float (&acc)[MT][NT][4], const T* x, int64_t stride_x, int64_t x_row0,
                                         int64_t x_rows, const T* y, int64_t stride_y, int64_t y_row0, int64_t y_rows,
                                         int D, unsigned char* smem) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.f;
  const bool vec = vector_loads(x, stride_x, D) && vector_loads(y, stride_y, D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wr = (warp / 2) * kWarpRows, wc = (warp % 2) * kWarpCols;
  if constexpr (sizeof(T) == 2) {
    T* sx = reinterpret_cast<T*>(smem);
    T* sy = sx + kBlockM * kLd16;
    for (int k0 = 0; k0 < D; k0 += kBlockK16) {
      __syncthreads();  // the previous chunk (or tile) is no longer read
      load_tile<T, kBlockK16, kLd16>(sx, x, stride_x, x_row0, x_rows, k0, D, vec);
      load_tile<T, kBlockK16, kLd16>(sy, y, stride_y, y_row0, y_rows, k0, D, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBlockK16; kk += 16) {
        uint32_t a[MT][4], b[NT][2];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const int r = wr + mi * 16 + g;
          a[mi][0] = pair_at(sx, r * kLd16 + kk + 2 * t);
          a[mi][1] = pair_at(sx, (r + 8) * kLd16 + kk + 2 * t);
          a[mi][2] = pair_at(sx, r * kLd16 + kk + 2 * t + 8);
          a[mi][3] = pair_at(sx, (r + 8) * kLd16 + kk + 2 * t + 8);
        }
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
          const int c = wc + ni * 8 + g;
          b[ni][0] = pair_at(sy, c * kLd16 + kk + 2 * t);
          b[ni][1] = pair_at(sy, c * kLd16 + kk + 2 * t + 8);
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni]);
      }
    }
  } else {
    float* sx = reinterpret_cast<float*>(smem);
    float* sy = sx + kBlockM * kLd32;
    for (int k0 = 0; k0 < D; k0 += kBlockK32) {
      __syncthreads();
      load_tile<float, kBlockK32, kLd32>(sx, x, stride_x, x_row0, x_rows, k0, D, vec);
      load_tile<float, kBlockK32, kLd32>(sy, y, stride_y, y_row0, y_rows, k0, D, vec);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kBlockK32; ++kk) {
        float xa[MT][2], yb[NT][2];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) xa[mi][h] = sx[(wr + mi * 16 + g + 8 * h) * kLd32 + kk];
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) yb[ni][e] = sy[(wc + ni * 8 + 2 * t + e) * kLd32 + kk];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                acc[mi][ni][2 * h + e] = fmaf(xa[mi][h], yb[ni][e], acc[mi][ni][2 * h + e]);
      }
    }
  }
}

// Everything one thread needs to evaluate its 32 elements of the tile at (row0, col0): the
// cosines c = <q_i, k_j> a_i b_j, the margin teacher's cosines (ADAPTIVE), the filter's verdicts
// (FILTER) and where the rows' positives are.
template <typename T, bool ADAPTIVE, bool FILTER>
struct Tile {
  float c[MT][NT][4];
  float teacher[ADAPTIVE ? MT : 1][ADAPTIVE ? NT : 1][4];
  uint32_t removed = 0, poisoned = 0;  // filter verdict per element (bit_of)
  int pos[MT][2];                      // the positive's local column, -1 when not in this tile
  int64_t row0, col0;

  __device__ __forceinline__ void compute(const TileArgs& p, int64_t row0_, int64_t col0_, unsigned char* smem) {
    row0 = row0_;
    col0 = col0_;
    if constexpr (FILTER) {  // the filter tile first: only its verdict bits stay live
      dot_tile<float>(c, p.filter_query, p.stride_fq, row0, p.M, p.filter_key, p.stride_fk, col0, p.N, p.DF, smem);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const uint32_t bit = 1u << ((mi * NT + ni) * 4 + r);
            if (filter_removes(c[mi][ni][r], p.threshold)) removed |= bit;
            if (filter_poisons(c[mi][ni][r])) poisoned |= bit;
          }
    }
    if constexpr (ADAPTIVE)
      dot_tile<float>(teacher, p.margin_query, p.stride_mq, row0, p.M, p.margin_key, p.stride_mk, col0, p.N, p.DT,
                      smem);
    dot_tile<T>(c, static_cast<const T*>(p.query), p.stride_q, row0, p.M, static_cast<const T*>(p.key), p.stride_k,
                col0, p.N, p.D, smem);
    float b[NT][2];
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t j = col0 + local_col(ni, e);
        b[ni][e] = j < p.N ? p.inv_norm_k[j] : 0.f;
      }
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = row0 + local_row(mi, h);
        const float a = i < p.M ? p.inv_norm_q[i] : 0.f;
        const int64_t j = i < p.M ? p.positives[i] : -1;
        pos[mi][h] = j >= col0 && j < col0 + kBlockN && j < p.N ? int(j - col0) : -1;
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) c[mi][ni][2 * h + e] = c[mi][ni][2 * h + e] * a * b[ni][e];
      }
  }

  // Element (mi, ni, h, e): tile_math.h's evaluation with its logit masked (-inf where not
  // allowed), its cosine and whether it is the row's positive.
  __device__ __forceinline__ Element<float> element(const TileArgs& p, float inv_temp, int mi, int ni, int h, int e,
                                                    bool& is_positive) const {
    const int64_t i = row0 + local_row(mi, h), j = col0 + local_col(ni, e);
    const int bit = bit_of(mi, ni, h, e);
    const float cos = c[mi][ni][2 * h + e];
    is_positive = local_col(ni, e) == pos[mi][h];
    bool removed_here = j >= p.N || i >= p.M;
    if (p.key_groups != nullptr && !removed_here) removed_here = group_removes(p.key_groups[j], p.row_groups[i]);
    bool poisoned_here = false;
    if constexpr (FILTER) {
      removed_here = removed_here || ((removed >> bit) & 1u);
      poisoned_here = (poisoned >> bit) & 1u;
    }
    MarginPair<float> margin{p.cos_base, p.cos_m, p.sin_m};
    if constexpr (ADAPTIVE) margin = adaptive_margin(p.cos_base, p.margin, teacher[mi][ni][2 * h + e]);
    Element<float> el = evaluate(cos, is_positive, removed_here, poisoned_here, p.margin > 0.f, margin, inv_temp);
    el.logit = masked_logit(el);
    return el;
  }
};

}  // namespace cuda
}  // namespace mmloss
