// Host emulation of the CUDA subset that csrc/cuda uses (docs/cuda.md, "Host emulation"):
// kernels compiled by g++ with MMLOSS_CUDA_HOST_EMULATION, each CTA's threads run as fibers
// that switch only at barriers and warp collectives, so __syncthreads, shuffles and mma.sync
// exchange data as on the GPU. One launch at a time; blocks run one after another.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one copy per kernel: blocks run one at a time
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };

namespace mmloss_emulation {

// Data a warp's lanes exchange in a collective (shuffle, mma.sync).
struct WarpExchange {
  uint64_t value[32];
  uint32_t a[32][4], b[32][2];
  float c[32][4];
};

void fail(const char* what);           // ends the launch with cudaErrorLaunchFailure
void block_barrier();                  // __syncthreads
void warp_barrier();                   // all 32 lanes of the caller's warp (full mask only)
WarpExchange& warp_exchange();         // the caller's warp's
int lane_id();
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& thread_body);
cudaError_t take_last_error();
const char* last_message();
void set_reverse_order(bool reverse);  // fibers run in decreasing thread order between barriers

template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // by value, as the GPU passes them
    run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
  }
};
template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return {grid, block, smem, kernel};
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  if (mask != 0xffffffffu || width != 32) fail("only full-warp shuffles are emulated");
  WarpExchange& w = warp_exchange();
  const int lane = lane_id();
  std::memcpy(&w.value[lane], &v, sizeof v);
  warp_barrier();
  T out;
  std::memcpy(&out, &w.value[lane ^ lane_mask], sizeof out);
  warp_barrier();  // nobody overwrites a value before every lane has read it
  return out;
}

// Element `half` (0 = low 16 bits) of a .f16x2/.bf16x2 register as float.
template <typename T>
float element_of(uint32_t reg, int half) {
  T x;
  const uint16_t bits = uint16_t(reg >> (16 * half));
  std::memcpy(&x, &bits, sizeof bits);
  return float(x);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 with D = C in place:
// the warp's fragments are gathered per the PTX ISA's "Matrix Fragments for mma.m16n8k16
// with floating point type" (groupID = lane >> 2, threadID_in_group = lane % 4), multiplied
// with fp32 accumulation (16-bit products are exact) and scattered back.
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  WarpExchange& w = warp_exchange();
  const int lane = lane_id();
  std::memcpy(w.a[lane], a, sizeof a);
  std::memcpy(w.b[lane], b, sizeof b);
  std::memcpy(w.c[lane], d, sizeof d);
  warp_barrier();
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int group = l >> 2, tig = l % 4;
    for (int i = 0; i < 8; ++i) {  // a0..a7, two per register, low half first
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = element_of<T>(w.a[l][i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {  // b0..b3
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][group] = element_of<T>(w.b[l][i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) C[i < 2 ? group : group + 8][tig * 2 + (i & 1)] = w.c[l][i];
  }
  warp_barrier();  // every lane has its copy of the fragments
  const int group = lane >> 2, tig = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? group : group + 8, col = tig * 2 + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc = fmaf(A[row][k], B[k][col], acc);
    d[i] = acc;
  }
}

// Stores through vector types must be aligned as on the GPU (else: misaligned address).
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail("misaligned vector access");
}

}  // namespace mmloss_emulation

#define MMLOSS_LAUNCH(grid, block, smem, stream, ...) \
  ::mmloss_emulation::launch(grid, block, smem, stream, __VA_ARGS__)

inline void __syncthreads() { mmloss_emulation::block_barrier(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return mmloss_emulation::shfl_xor(mask, v, lane_mask, width);
}
// Fibers switch only at barriers and collectives: a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  const T old = *address;
  *address = old + v;
  return old;
}
inline cudaError_t cudaGetLastError() { return mmloss_emulation::take_last_error(); }
inline const char* cudaGetErrorString(cudaError_t) { return mmloss_emulation::last_message(); }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4& operator=(const uint4& o) {
    mmloss_emulation::check_aligned(this, 16);
    x = o.x, y = o.y, z = o.z, w = o.w;
    return *this;
  }
};
struct alignas(8) float2 {
  float x, y;
  float2& operator=(const float2& o) {
    mmloss_emulation::check_aligned(this, 8);
    x = o.x, y = o.y;
    return *this;
  }
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
template <typename T>
T __ldg(const T* p) {
  mmloss_emulation::check_aligned(p, alignof(T));
  return *p;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
