// Deterministic random fills (model_ops.h) for synthetic models and for the KV pool: a
// splitmix64 hash of (seed, index), so any element can be generated independently and the same
// seed gives the same tensor on any device.
#include <algorithm>

#include "backends/cuda/model_ops.h"
#include "backends/cuda/model_ops_common.cuh"

namespace adakv::cuda {
namespace {

__device__ __forceinline__ uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ float uniform_pm1(uint64_t seed, int64_t i) {
  const uint64_t r = splitmix(seed ^ splitmix(static_cast<uint64_t>(i)));
  return static_cast<float>(static_cast<int64_t>(r >> 40) - (int64_t{1} << 23)) * (1.0f / 8388608.0f);
}

__global__ void fill_bf16_kernel(__nv_bfloat16* out, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(offset + scale * uniform_pm1(seed, i));
}

__global__ void fill_f32_kernel(float* out, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = offset + scale * uniform_pm1(seed, i);
}

unsigned fill_blocks(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65536)); }

}  // namespace

Status random_fill_bf16(__nv_bfloat16* out, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t stream) {
  if (n <= 0) return Status::ok();
  fill_bf16_kernel<<<fill_blocks(n), 256, 0, stream>>>(out, n, seed, scale, offset);
  return ops_detail::launch_status("random_fill_bf16");
}

Status random_fill_f32(float* out, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t stream) {
  if (n <= 0) return Status::ok();
  fill_f32_kernel<<<fill_blocks(n), 256, 0, stream>>>(out, n, seed, scale, offset);
  return ops_detail::launch_status("random_fill_f32");
}

}  // namespace adakv::cuda
