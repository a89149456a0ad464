// Paged attention for any head dim (model_ops.h): the fallback behind decode_attention and
// prefill_attention, which cover head dims 64 and 128 only. Correct, not fast: one warp per
// (token, query head) walks the visible entries of its kv head's row one at a time, each lane
// holding head_dim / 32 elements of q and of the output accumulator.
#include <cfloat>

#include "backends/cuda/model_ops.h"
#include "backends/cuda/model_ops_common.cuh"
#include "backends/cuda/paged_kv_view.h"

namespace adakv::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

__global__ void __launch_bounds__(kWarps * 32)
    attention_generic_kernel(DeviceKvPool pool, StepBatchView batch, int32_t layer, int32_t num_heads,
                             int32_t head_dim, const __nv_bfloat16* __restrict__ q, int64_t q_row_stride,
                             __nv_bfloat16* __restrict__ out, int64_t out_row_stride, float scale) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (item >= static_cast<int64_t>(batch.num_tokens) * num_heads) return;
  const int64_t t = item / num_heads;
  const int h = static_cast<int>(item % num_heads);
  const int g = num_heads / batch.num_kv_heads, kvh = h / g;
  const int b = batch.token_seq[t];
  const int64_t row = (static_cast<int64_t>(batch.seq_ids[b]) * batch.num_layers + layer) * batch.num_kv_heads + kvh;
  const int len = batch.row_len[(static_cast<int64_t>(b) * batch.num_layers + layer) * batch.num_kv_heads + kvh];
  const int visible = len - batch.seq_ntok[b] + batch.token_index[t] + 1;
  const int32_t* pages = pool.page_table + row * pool.max_pages_per_row;

  float qv[kMaxPerLane], acc[kMaxPerLane];
  const __nv_bfloat16* qrow = q + t * q_row_stride + static_cast<int64_t>(h) * head_dim;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int e = lane + 32 * j;
    qv[j] = e < head_dim ? __bfloat162float(qrow[e]) : 0.f;
    acc[j] = 0.f;
  }
  float m = -FLT_MAX, l = 0.f;
  for (int i = 0; i < visible; ++i) {
    const int64_t base = static_cast<int64_t>(pages[i / kPageSize]) * pool.page_stride +
                         static_cast<int64_t>(i % kPageSize) * head_dim;
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) {
      const int e = lane + 32 * j;
      if (e < head_dim) dot += qv[j] * __bfloat162float(pool.k_pool[base + e]);
    }
    const float s = ops_detail::warp_sum(dot) * scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new), p = expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j) {
      const int e = lane + 32 * j;
      if (e < head_dim) acc[j] = acc[j] * corr + p * __bfloat162float(pool.v_pool[base + e]);
    }
    m = m_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  __nv_bfloat16* orow = out + t * out_row_stride + static_cast<int64_t>(h) * head_dim;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int e = lane + 32 * j;
    if (e < head_dim) orow[e] = __float2bfloat16(acc[j] * inv);
  }
}

}  // namespace

Status attention_generic(const DeviceKvPool& pool, const StepBatchView& batch, int32_t layer, int32_t num_heads,
                         int32_t head_dim, const __nv_bfloat16* q, int64_t q_row_stride, __nv_bfloat16* out,
                         int64_t out_row_stride, float scale, cudaStream_t stream) {
  if (head_dim <= 0 || head_dim > 32 * kMaxPerLane)
    return unimplemented("attention_generic: head_dim " + std::to_string(head_dim) + " (supported: 1..256)");
  if (batch.num_kv_heads <= 0 || num_heads % batch.num_kv_heads != 0)
    return invalid_argument("attention_generic: query heads must be a multiple of kv heads");
  if (batch.num_tokens <= 0) return Status::ok();
  const int64_t items = static_cast<int64_t>(batch.num_tokens) * num_heads;
  attention_generic_kernel<<<static_cast<unsigned>((items + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(
      pool, batch, layer, num_heads, head_dim, q, q_row_stride, out, out_row_stride, scale);
  return ops_detail::launch_status("attention_generic");
}

}  // namespace adakv::cuda
