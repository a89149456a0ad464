// Small device helpers shared by the model ops (model_ops.h): launch-error conversion, warp and
// block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>

#include "core/status.h"

namespace adakv::cuda::ops_detail {

inline Status launch_status(const char* what, cudaError_t err) {
  if (err == cudaSuccess) return Status::ok();
  return internal_error(std::string(what) + ": launch failed: " + cudaGetErrorName(err) + " (" +
                        cudaGetErrorString(err) + ")");
}
inline Status launch_status(const char* what) { return launch_status(what, cudaGetLastError()); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result. `scratch` >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  float t = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(t);
}

}  // namespace adakv::cuda::ops_detail
