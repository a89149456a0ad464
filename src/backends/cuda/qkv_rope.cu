// Bias + q/k RMSNorm + RoPE on the fused projection output (model_ops.h), and the per-step RoPE
// table. One warp per (token, head): the head's vector is staged in shared memory because RoPE
// pairs element i with i + d/2, which lives in another lane for head dims below 64.
#include "backends/cuda/dependent_launch.cuh"
#include "backends/cuda/model_ops.h"
#include "backends/cuda/model_ops_common.cuh"

namespace adakv::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxDim = 256;

__global__ void __launch_bounds__(kWarps * 32) qkv_rope_kernel(QkvRopeArgs a) {
  __shared__ float vec[kWarps][kMaxDim];
  await_preceding_grid();
  release_dependent_grid();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int heads = a.num_heads + 2 * a.num_kv_heads;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (item >= static_cast<int64_t>(a.n) * heads) return;
  const int64_t t = item / heads;
  const int head = static_cast<int>(item % heads);
  const int d = a.head_dim, half = d / 2;
  __nv_bfloat16* row = a.qkv + t * a.row_stride + static_cast<int64_t>(head) * d;
  float* s = vec[warp];
  const float* bias = a.bias != nullptr ? a.bias + static_cast<int64_t>(head) * d : nullptr;
  for (int i = lane; i < d; i += 32) s[i] = __bfloat162float(row[i]) + (bias != nullptr ? bias[i] : 0.f);
  const bool is_v = head >= a.num_heads + a.num_kv_heads;
  // With an append target, a K or V head's vector also goes into its committed pool entry.
  __nv_bfloat16* entry = nullptr;
  if (a.pool.k_pool != nullptr && head >= a.num_heads) {
    const int h = head - a.num_heads - (is_v ? a.num_kv_heads : 0);
    const int64_t slot = ops_detail::committed_slot(a.pool, a.batch, a.layer, t, h);
    entry = (is_v ? a.pool.v_pool : a.pool.k_pool) + slot / kPageSize * a.pool.page_stride + slot % kPageSize * d;
    if (!is_v && lane == 0 && a.pool.positions != nullptr) a.pool.positions[slot] = a.batch.positions[t];
  }
  if (is_v) {
    for (int i = lane; i < d; i += 32) {
      const __nv_bfloat16 v = __float2bfloat16(s[i]);
      if (bias != nullptr) row[i] = v;
      if (entry != nullptr) entry[i] = v;
    }
    return;
  }
  const float* norm = head < a.num_heads ? a.q_norm : a.k_norm;
  if (norm != nullptr) {
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) ss += s[i] * s[i];
    ss = ops_detail::warp_sum(ss);
    const float inv_rms = 1.0f / sqrtf(ss / static_cast<float>(d) + a.eps);
    for (int i = lane; i < d; i += 32) s[i] = norm[i] * (s[i] * inv_rms);
  }
  __syncwarp();
  const float2* cs = a.cos_sin + t * half;
  for (int i = lane; i < half; i += 32) {
    const float x1 = s[i], x2 = s[i + half];
    const float2 c = cs[i];
    const __nv_bfloat16 y1 = __float2bfloat16(x1 * c.x - x2 * c.y), y2 = __float2bfloat16(x2 * c.x + x1 * c.y);
    row[i] = y1;
    row[i + half] = y2;
    if (entry != nullptr) {
      entry[i] = y1;
      entry[i + half] = y2;
    }
  }
}

__global__ void rope_cos_sin_kernel(const float* __restrict__ inv_freq, const int32_t* __restrict__ positions,
                                    int32_t n, int32_t half, float2* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(n) * half) return;
  const int64_t t = idx / half;
  const int i = static_cast<int>(idx % half);
  const float angle = __fmul_rn(inv_freq[i], static_cast<float>(positions[t]));  // rounded as transformers
  double sn, cn;
  sincos(static_cast<double>(angle), &sn, &cn);
  out[idx] = make_float2(static_cast<float>(cn), static_cast<float>(sn));
}

}  // namespace

Status qkv_rope(const QkvRopeArgs& a, cudaStream_t stream) {
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > kMaxDim)
    return unimplemented("qkv_rope: head_dim " + std::to_string(a.head_dim) + " (supported: even, <= 256)");
  if (a.qkv == nullptr || a.cos_sin == nullptr) return invalid_argument("qkv_rope: null qkv or cos_sin");
  if ((a.q_norm == nullptr) != (a.k_norm == nullptr)) return invalid_argument("qkv_rope: q_norm and k_norm go together");
  if (a.pool.k_pool != nullptr && (a.batch.num_tokens != a.n || a.head_dim % 8 != 0))
    return invalid_argument("qkv_rope: an append target needs batch.num_tokens == n and head_dim a multiple of 8");
  if (a.n <= 0) return Status::ok();
  const int64_t items = static_cast<int64_t>(a.n) * (a.num_heads + 2 * a.num_kv_heads);
  return ops_detail::launch_status("qkv_rope", launch_dependent(qkv_rope_kernel, dim3((items + kWarps - 1) / kWarps),
                                                                 dim3(kWarps * 32), 0, stream, a));
}

Status rope_cos_sin(const float* inv_freq, const int32_t* positions, int32_t n, int32_t half, float2* cos_sin,
                    cudaStream_t stream) {
  if (n <= 0) return Status::ok();
  const int64_t total = static_cast<int64_t>(n) * half;
  rope_cos_sin_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(inv_freq, positions, n, half,
                                                                                   cos_sin);
  return ops_detail::launch_status("rope_cos_sin");
}

}  // namespace adakv::cuda
