// CriticalKV's second-stage score on the GPU (method.md 1.2):
//   norm[kvh][j] = mean over the group's query heads h of || v_j W_o^h ||_1
//   crit[kvh][j] = (S[kvh][j] + 1e-4) * norm[kvh][j]                        for j < n
// with W_o^h the d x hidden slice of o_proj for head h (o_proj [hidden][H * d], the checkpoint's
// layout, out = W x), v_j the value of entry j, S the pooled SnapKV score. Matches
// critical_value_norms / compute_layer_scores of compress/ to about 1e-6 relative.
//
// Cost: 2 * n * H * d * hidden flops per layer (as much as the o_proj GEMM over n tokens), on tensor
// cores (mma.sync bf16, fp32 accumulation) with the L1 norm fused into the epilogue: a cuBLASLt GEMM
// would have to write and re-read the n x H x hidden products (4.3 GB per layer in fp32 at 8K), which
// costs more than the products themselves.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/status.h"

namespace adakv::cuda {

struct CriticalInputs {
  const __nv_bfloat16* values = nullptr;  // entry j of kv head k at values + j * v_token_stride + k * v_head_stride
  int64_t v_token_stride = 0;             // elements; 0 means Hkv * head_dim ([n][Hkv][head_dim])
  const __nv_bfloat16* o_proj = nullptr;  // [hidden][H * head_dim]
  int32_t hidden_size = 0;
  int32_t num_heads = 0;     // H
  int32_t num_kv_heads = 0;  // Hkv
  int32_t head_dim = 0;      // 64 or 128
  int32_t count = 0;         // n: entries scored per kv head (the prefix, L - w)
  const float* scores = nullptr;  // [Hkv][scores_stride] pooled SnapKV scores S
  int64_t scores_stride = 0;
  int64_t v_head_stride = 0;      // elements; 0 means head_dim (heads of a token side by side)
};

// crit: [Hkv][crit_stride]; norms: optional [Hkv][norms_stride] (nullptr: not written). Asynchronous.
Status critical_scores(const CriticalInputs& in, float* crit, int64_t crit_stride, float* norms, int64_t norms_stride,
                       cudaStream_t stream);

}  // namespace adakv::cuda
