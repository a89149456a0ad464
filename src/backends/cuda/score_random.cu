// Random scores (score_random.h): one thread per (kv head, entry).
#include "backends/cuda/score_random.h"

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/score_common.cuh"

namespace adakv::cuda {

namespace {

__host__ __device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__global__ void random_scores_kernel(uint64_t seed, int32_t layer, int32_t num_kv_heads, int32_t count, float* out,
                                     int64_t out_stride) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(num_kv_heads) * count) return;
  const int32_t h = static_cast<int32_t>(idx / count), j = static_cast<int32_t>(idx % count);
  const uint64_t base = splitmix64(splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(layer)) ^ static_cast<uint64_t>(h));
  out[h * out_stride + j] = static_cast<float>(splitmix64(base ^ static_cast<uint64_t>(j)) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace

Status random_scores_rows(uint64_t seed, int32_t layer, int32_t num_kv_heads, int32_t count, float* out,
                          int64_t out_stride, cudaStream_t stream) {
  if (num_kv_heads < 1 || count < 0 || out_stride < count || out == nullptr)
    return invalid_argument("random_scores_rows: bad shape or null output");
  const int64_t total = int64_t{num_kv_heads} * count;
  ADAKV_CUDA_RETURN_IF_ERROR(score_detail::launch(random_scores_kernel,
                                                  dim3(static_cast<unsigned>(score_detail::ceil_div(total, 256))),
                                                  dim3(256), 0, stream, seed, layer, num_kv_heads, count, out,
                                                  out_stride));
  return Status::ok();
}

}  // namespace adakv::cuda
