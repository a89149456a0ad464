// Small device helpers shared by the model ops (model_ops.h): launch-error conversion, warp and
// block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>

#include "backends/cuda/model_ops.h"
#include "backends/cuda/paged_kv_view.h"
#include "core/status.h"

namespace adakv::cuda::ops_detail {

inline Status launch_status(const char* what, cudaError_t err) {
  if (err == cudaSuccess) return Status::ok();
  return internal_error(std::string(what) + ": launch failed: " + cudaGetErrorName(err) + " (" +
                        cudaGetErrorString(err) + ")");
}
inline Status launch_status(const char* what) { return launch_status(what, cudaGetLastError()); }

// SwiGLU of one gate / up pair: silu(g) * u (swiglu(), and the down projection that fuses it).
__device__ __forceinline__ float silu_mul(float g, float u) { return (g / (1.0f + expf(-g))) * u; }

// SwiGLU of 8 consecutive gate / up pairs (16-byte pieces of bf16), rounded to bf16.
__device__ __forceinline__ uint4 swiglu8(const uint4& gates, const uint4& ups) {
  const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gates);
  const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&ups);
  uint4 out;
  __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 gf = __bfloat1622float2(g2[j]), uf = __bfloat1622float2(u2[j]);
    o2[j] = __floats2bfloat162_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
  }
  return out;
}

// The pool slot (page * kPageSize + offset) of token t's entry in kv head h of `layer`: entry
// row_len - seq_ntok + token_index of its row, the entry the step committed for it.
__device__ __forceinline__ int64_t committed_slot(const DeviceKvPool& pool, const StepBatchView& batch, int32_t layer,
                                                  int64_t t, int h) {
  const int b = batch.token_seq[t];
  const int64_t row = (static_cast<int64_t>(batch.seq_ids[b]) * batch.num_layers + layer) * batch.num_kv_heads + h;
  const int len = batch.row_len[(static_cast<int64_t>(b) * batch.num_layers + layer) * batch.num_kv_heads + h];
  const int entry = len - batch.seq_ntok[b] + batch.token_index[t];
  const int page = pool.page_table[row * pool.max_pages_per_row + entry / kPageSize];
  return static_cast<int64_t>(page) * kPageSize + entry % kPageSize;
}

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
