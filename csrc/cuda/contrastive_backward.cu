// Backward of the core op on CUDA, the Triton backend's design (docs/cuda.md): per row chunk,
// `grad_tile_kernel` recomputes each 64 × 64 tile exactly as the forward does and writes
// H_ij = a_i b_j G_ij / g (G = dL/dc) into an R × C scratch, with the row/column sums of G·c and
// the rows' shares of dL/d(1/τ); two cuBLAS GEMMs (the ATen glue) give H K and Hᵀ Q, and
// `finish_kernel` applies the normalisation Jacobian's radial term.
#include "tile.cuh"

namespace mmloss {
namespace cuda {
namespace {

constexpr int kGroupM = 16;  // row tiles per band of the tile order: CTAs in flight share K tiles in L2

// Tile (row, column) of a 1-D block index, row tile fastest within bands of kGroupM row tiles.
__device__ __forceinline__ void grouped_tile(int64_t id, int64_t tiles_m, int64_t tiles_n, int64_t& tm,
                                             int64_t& tn) {
  const int64_t per_band = int64_t(kGroupM) * tiles_n;
  const int64_t first_m = id / per_band * kGroupM;
  const int64_t band_m = tiles_m - first_m < kGroupM ? tiles_m - first_m : kGroupM;
  const int64_t in_band = id % per_band;
  tm = first_m + in_band % band_m;
  tn = in_band / band_m;
}

template <typename T, bool ADAPTIVE, bool FILTER>
__global__ void __launch_bounds__(kThreads, 1) grad_tile_kernel(const TileArgs p, const GradArgs q) {
  __shared__ __align__(16) unsigned char smem[kTileSmemBytes];
  const int64_t tiles_m = (q.row_end - q.row0 + kBlockM - 1) / kBlockM;
  const int64_t tiles_n = (q.col_end - q.col0 + kBlockN - 1) / kBlockN;
  int64_t tm, tn;
  grouped_tile(blockIdx.x, tiles_m, tiles_n, tm, tn);
  const int64_t row0 = q.row0 + tm * kBlockM, col0 = q.col0 + tn * kBlockN;
  const float inv_temp = *p.inv_temp;
  const float inv_scale = 1.f / *q.scale;

  Tile<T, ADAPTIVE, FILTER> tile;
  tile.compute(p, row0, col0, smem);

  T* h_out = static_cast<T*>(q.h);
  const bool pair_stores = q.stride_h % 2 == 0;  // two columns per 32/64-bit store
  float col_part[NT][2];
#pragma unroll
  for (int ni = 0; ni < NT; ++ni) col_part[ni][0] = col_part[ni][1] = 0.f;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = row0 + local_row(mi, h);
      const bool row_ok = i < q.row_end;
      const float lse = row_ok ? q.lse[i] : 0.f, w = row_ok ? q.weight[i] : 0.f;
      const float h_row = (row_ok ? p.inv_norm_q[i] : 0.f) * inv_scale;
      float row_part = 0.f, temp_part = 0.f;
#pragma unroll
      for (int ni = 0; ni < NT; ++ni) {
        const int64_t j = col0 + local_col(ni, 0);
        T pair[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          bool is_positive;
          const Element<float> el = tile.element(p, inv_temp, mi, ni, h, e, is_positive);
          const float c = tile.c[mi][ni][2 * h + e];
          // P from the given lse; removed columns have P = 0 (also when lse = -inf).
          const float prob = el.allowed || el.logit != el.logit ? exp_f(el.logit - lse) : 0.f;
          const bool valid = row_ok && j + e < q.col_end;
          const float d_logit = valid ? logit_grad(prob, 1.f, w, is_positive) : 0.f;
          const float g = cosine_grad(d_logit, el.df, inv_temp);
          pair[e] = from_float<T>(g * h_row * (valid ? p.inv_norm_k[j + e] : 0.f));
          row_part += g * c;
          col_part[ni][e] += g * c;
          temp_part += inv_temp_grad(d_logit, el.f, el.allowed);
        }
        if (row_ok && j < q.col_end) {
          T* dst = h_out + (i - q.row0) * q.stride_h + (j - q.col0);
          if (pair_stores && j + 1 < q.col_end) {
            if constexpr (sizeof(T) == 2) {
              __nv_bfloat162 packed;  // two 16-bit values of either type, as raw bits
              memcpy(&packed, pair, sizeof packed);
              *reinterpret_cast<__nv_bfloat162*>(dst) = packed;
            } else {
              *reinterpret_cast<float2*>(dst) = make_float2(pair[0], pair[1]);
            }
          } else {
            dst[0] = pair[0];
            if (j + 1 < q.col_end) dst[1] = pair[1];
          }
        }
      }
      // The four threads of a row hold its 32 columns of this warp.
#pragma unroll
      for (int off = 1; off < 4; off *= 2) {
        row_part += __shfl_xor_sync(0xffffffffu, row_part, off);
        temp_part += __shfl_xor_sync(0xffffffffu, temp_part, off);
      }
      if (threadIdx.x % 4 == 0 && row_ok) {
        atomicAdd(q.row_sum + i, row_part);
        if (q.row_temp != nullptr) atomicAdd(q.row_temp + i, temp_part);
      }
    }
  // The eight row groups (g) of a warp hold a column's 32 rows of this warp.
#pragma unroll
  for (int ni = 0; ni < NT; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float s = col_part[ni][e];
#pragma unroll
      for (int off = 4; off < 32; off *= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      const int64_t j = col0 + local_col(ni, e);
      if (threadIdx.x % 32 < 4 && j < q.col_end) atomicAdd(q.col_sum + j, s);
    }
}

// out = g · prod - coef x per row (tile_math.h's normalize_grad_radial), one element per thread.
template <typename P, typename T>
__global__ void finish_kernel(const P* __restrict__ prod, int64_t stride_p, const T* __restrict__ x, int64_t stride_x,
                              T* __restrict__ out, int64_t stride_o, const float* __restrict__ inv_norm,
                              const float* __restrict__ radial, const float* __restrict__ scale, int64_t rows,
                              int D) {
  const float g = *scale;
  const int64_t total = rows * D;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / D;
    const int c = int(idx - r * D);
    const float radial_term = normalize_grad_radial(inv_norm[r], radial[r], to_float(x[r * stride_x + c]));
    out[r * stride_o + c] = from_float<T>(g * to_float(prod[r * stride_p + c]) - radial_term);
  }
}

template <typename T, bool ADAPTIVE, bool FILTER>
void launch_grad_as(const TileArgs& p, const GradArgs& q, cudaStream_t stream) {
  const int64_t tiles =
      (q.row_end - q.row0 + kBlockM - 1) / kBlockM * ((q.col_end - q.col0 + kBlockN - 1) / kBlockN);
  MMLOSS_LAUNCH(unsigned(tiles), kThreads, 0, stream, grad_tile_kernel<T, ADAPTIVE, FILTER>)(p, q);
}

template <typename T>
void launch_grad_typed(const TileArgs& p, const GradArgs& q, cudaStream_t stream) {
  const bool adaptive = p.margin_query != nullptr, filter = p.filter_query != nullptr;
  if (adaptive && filter) launch_grad_as<T, true, true>(p, q, stream);
  else if (adaptive) launch_grad_as<T, true, false>(p, q, stream);
  else if (filter) launch_grad_as<T, false, true>(p, q, stream);
  else launch_grad_as<T, false, false>(p, q, stream);
}

template <typename P, typename T>
void launch_finish_as(const void* prod, int64_t stride_p, const void* x, int64_t stride_x, void* out,
                      int64_t stride_o, const float* inv_norm, const float* radial, const float* scale, int64_t rows,
                      int D, cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = (rows * D + threads - 1) / threads;
  MMLOSS_LAUNCH(unsigned(blocks < 65536 ? blocks : 65536), threads, 0, stream, finish_kernel<P, T>)(
      static_cast<const P*>(prod), stride_p, static_cast<const T*>(x), stride_x, static_cast<T*>(out), stride_o,
      inv_norm, radial, scale, rows, D);
}

}  // namespace

cudaError_t launch_grad_tile(const TileArgs& p, const GradArgs& q, cudaStream_t stream) {
  if (q.row_end <= q.row0 || q.col_end <= q.col0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: launch_grad_typed<float>(p, q, stream); break;
    case DType::kBFloat16: launch_grad_typed<__nv_bfloat16>(p, q, stream); break;
    case DType::kFloat16: launch_grad_typed<__half>(p, q, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_finish(DType dtype, bool prod_fp32, const void* prod, int64_t stride_p, const void* x,
                          int64_t stride_x, void* out, int64_t stride_o, const float* inv_norm, const float* radial,
                          const float* scale, int64_t rows, int D, cudaStream_t stream) {
  if (rows == 0 || D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      launch_finish_as<float, float>(prod, stride_p, x, stride_x, out, stride_o, inv_norm, radial, scale, rows, D,
                                     stream);
      break;
    case DType::kBFloat16:
      if (prod_fp32)
        launch_finish_as<float, __nv_bfloat16>(prod, stride_p, x, stride_x, out, stride_o, inv_norm, radial, scale,
                                               rows, D, stream);
      else
        launch_finish_as<__nv_bfloat16, __nv_bfloat16>(prod, stride_p, x, stride_x, out, stride_o, inv_norm, radial,
                                                       scale, rows, D, stream);
      break;
    case DType::kFloat16:
      if (prod_fp32)
        launch_finish_as<float, __half>(prod, stride_p, x, stride_x, out, stride_o, inv_norm, radial, scale, rows, D,
                                        stream);
      else
        launch_finish_as<__half, __half>(prod, stride_p, x, stride_x, out, stride_o, inv_norm, radial, scale, rows,
                                         D, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmloss
