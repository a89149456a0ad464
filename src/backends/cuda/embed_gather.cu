// Embedding lookup into the fp32 residual stream (model_ops.h). Memory-bound: one block per
// token, 16-byte loads of the bf16 row when the hidden size allows.
#include "backends/cuda/model_ops.h"
#include "backends/cuda/model_ops_common.cuh"

namespace adakv::cuda {
namespace {

__global__ void embed_gather_kernel(const __nv_bfloat16* __restrict__ table, int64_t hidden,
                                    const int32_t* __restrict__ tokens, float* __restrict__ x) {
  const int64_t t = blockIdx.x;
  const __nv_bfloat16* src = table + static_cast<int64_t>(tokens[t]) * hidden;
  float* dst = x + t * hidden;
  if (hidden % 8 == 0) {
    for (int64_t c = threadIdx.x; c < hidden / 8; c += blockDim.x) {
      const uint4 raw = reinterpret_cast<const uint4*>(src)[c];
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
      float4 a, b;
      float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]);
      float2 f2 = __bfloat1622float2(h[2]), f3 = __bfloat1622float2(h[3]);
      a = make_float4(f0.x, f0.y, f1.x, f1.y);
      b = make_float4(f2.x, f2.y, f3.x, f3.y);
      reinterpret_cast<float4*>(dst)[2 * c] = a;
      reinterpret_cast<float4*>(dst)[2 * c + 1] = b;
    }
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
  }
}

}  // namespace

Status embed_gather(const __nv_bfloat16* table, int64_t hidden, const int32_t* tokens, int32_t n, float* x,
                    cudaStream_t stream) {
  if (n <= 0) return Status::ok();
  if (hidden % 8 == 0 && ((reinterpret_cast<uintptr_t>(table) | reinterpret_cast<uintptr_t>(x)) & 15) != 0)
    return invalid_argument("embed_gather: table and x must be 16-byte aligned");
  embed_gather_kernel<<<n, 256, 0, stream>>>(table, hidden, tokens, x);
  return ops_detail::launch_status("embed_gather");
}

}  // namespace adakv::cuda
