// Device instantiation of the shared per-element math (csrc/include/mmloss/tile_math.h):
// a kernel that evaluates SPEC §1's transform on a flat array of similarities. It keeps the
// shared header compiling for sm_80/sm_90 in CI; the CUDA backend's tiled kernels build on it.
// Raw pointers only, no ATen, so nvcc compiles it without a CUDA torch.
#include <cuda_runtime.h>

#include "mmloss/tile_math.h"

namespace mmloss {

// For each i: logit, f and df/dc of a negative under margin m (or the positive when
// is_positive[i] != 0), with cos_base = cos(m).
__global__ void element_math_kernel(const float* __restrict__ cosines, const unsigned char* __restrict__ is_positive,
                                    float margin, float inv_temp, int n, float* __restrict__ logit,
                                    float* __restrict__ f, float* __restrict__ df) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const MarginPair<float> pair{cosf(margin), cosf(margin), sinf(margin)};
  const Element<float> e = evaluate(cosines[i], is_positive[i] != 0, false, false, margin > 0.f, pair, inv_temp);
  logit[i] = e.logit;
  f[i] = e.f;
  df[i] = e.df;
}

cudaError_t launch_element_math(const float* cosines, const unsigned char* is_positive, float margin,
                                float inv_temp, int n, float* logit, float* f, float* df, cudaStream_t stream) {
  const int threads = 256;
  element_math_kernel<<<(n + threads - 1) / threads, threads, 0, stream>>>(cosines, is_positive, margin, inv_temp,
                                                                           n, logit, f, df);
  return cudaGetLastError();
}

}  // namespace mmloss
