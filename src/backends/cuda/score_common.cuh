// Helpers shared by the scoring, selection and compaction kernels (score_*, select_*, compact_*):
// a launch wrapper (every launch goes through cudaLaunchKernelEx, checked at once), the dynamic
// shared-memory declaration, bf16 vector loads and warp reductions with a fixed order (so every
// result is deterministic: re-scoring a preempted request gives the identical plan).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "backends/cuda/dependent_launch.cuh"

// Dynamic shared memory of a kernel as an array of bytes (16-byte aligned). A macro so that a host
// emulation of the kernels (a development tool, not part of the build) can supply its own buffer.
#ifndef ADAKV_DYNAMIC_SMEM
#define ADAKV_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace adakv::cuda::score_detail {

// Launches `kernel` plainly and returns the launch error (launch_kernel in dependent_launch.cuh).
template <typename... Expected, typename... Actual>
inline cudaError_t launch(void (*kernel)(Expected...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Actual&&... args) {
  return launch_kernel(false, kernel, grid, block, smem_bytes, stream, std::forward<Actual>(args)...);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 8 consecutive bf16 (one 16-byte load; `p` must be 16-byte aligned) as floats.
__device__ __forceinline__ void load_bf16x8(const __nv_bfloat16* p, float out[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 -> fp32 is exact: the 16 bits become the high half of the float.
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// Reductions over the 16 lanes of a half warp (lanes that differ only in bits 0-3). Every lane
// of the warp must call them (the shuffles are warp-wide); the xor tree fixes the order.
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int m = 8; m >= 1; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int m = 8; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
__device__ __forceinline__ double half_warp_sum(double v) {
#pragma unroll
  for (int m = 8; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
__device__ __forceinline__ unsigned long long warp_min(unsigned long long v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, m);
    v = o < v ? o : v;
  }
  return v;
}

}  // namespace adakv::cuda::score_detail
