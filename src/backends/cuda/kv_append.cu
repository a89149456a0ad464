// K/V append into per-head pages and the gather of whole rows (model_ops.h). One thread per
// 16-byte chunk of one entry's K or V: the page table lookup is per entry, the copies coalesce
// within an entry and pages are 16 entries long, so a warp writes whole 512-byte runs at d 128.
#include "backends/cuda/dependent_launch.cuh"
#include "backends/cuda/model_ops.h"
#include "backends/cuda/model_ops_common.cuh"
#include "backends/cuda/paged_kv_view.h"

namespace adakv::cuda {
namespace {

__global__ void kv_append_kernel(DeviceKvPool pool, StepBatchView batch, int32_t layer,
                                 const __nv_bfloat16* __restrict__ qkv, int64_t qkv_row_stride, int32_t k_offset,
                                 int32_t v_offset, int32_t head_dim) {
  await_preceding_grid();
  release_dependent_grid();
  const int chunks = head_dim / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_token = static_cast<int64_t>(batch.num_kv_heads) * chunks * 2;
  if (idx >= batch.num_tokens * per_token) return;
  const int64_t t = idx / per_token;
  int rem = static_cast<int>(idx % per_token);
  const bool is_v = rem >= batch.num_kv_heads * chunks;
  if (is_v) rem -= batch.num_kv_heads * chunks;
  const int h = rem / chunks, c = rem % chunks;
  const int64_t slot = ops_detail::committed_slot(pool, batch, layer, t, h);
  const int64_t dst = slot / kPageSize * pool.page_stride + slot % kPageSize * head_dim + c * 8;
  const __nv_bfloat16* src = qkv + t * qkv_row_stride + (is_v ? v_offset : k_offset) + h * head_dim + c * 8;
  *reinterpret_cast<uint4*>((is_v ? pool.v_pool : pool.k_pool) + dst) = *reinterpret_cast<const uint4*>(src);
  if (!is_v && c == 0 && pool.positions != nullptr) pool.positions[slot] = batch.positions[t];
}

__global__ void kv_gather_kernel(DeviceKvPool pool, int32_t seq, int32_t layer, int32_t num_layers,
                                 int32_t num_kv_heads, int32_t head_dim, const int32_t* __restrict__ lengths,
                                 int32_t max_length, __nv_bfloat16* __restrict__ k_out,
                                 __nv_bfloat16* __restrict__ v_out, int64_t out_head_stride) {
  const int chunks = head_dim / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_head = static_cast<int64_t>(max_length) * chunks;
  if (idx >= num_kv_heads * per_head) return;
  const int h = static_cast<int>(idx / per_head);
  const int entry = static_cast<int>((idx % per_head) / chunks), c = static_cast<int>(idx % chunks);
  if (entry >= lengths[h]) return;
  const int64_t row = (static_cast<int64_t>(seq) * num_layers + layer) * num_kv_heads + h;
  const int page = pool.page_table[row * pool.max_pages_per_row + entry / kPageSize];
  const int64_t src = static_cast<int64_t>(page) * pool.page_stride +
                      static_cast<int64_t>(entry % kPageSize) * head_dim + c * 8;
  const int64_t dst = h * out_head_stride + static_cast<int64_t>(entry) * head_dim + c * 8;
  *reinterpret_cast<uint4*>(k_out + dst) = *reinterpret_cast<const uint4*>(pool.k_pool + src);
  *reinterpret_cast<uint4*>(v_out + dst) = *reinterpret_cast<const uint4*>(pool.v_pool + src);
}

__global__ void page_table_scatter_kernel(const int2* __restrict__ updates, int32_t n, int32_t* __restrict__ table) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) table[updates[i].x] = updates[i].y;
}

}  // namespace

Status page_table_scatter(const int2* updates, int32_t n, int32_t* table, cudaStream_t stream) {
  if (n <= 0) return Status::ok();
  page_table_scatter_kernel<<<(n + 255) / 256, 256, 0, stream>>>(updates, n, table);
  return ops_detail::launch_status("page_table_scatter");
}

Status kv_append(const DeviceKvPool& pool, const StepBatchView& batch, int32_t layer, const __nv_bfloat16* qkv,
                 int64_t qkv_row_stride, int32_t k_offset, int32_t v_offset, int32_t head_dim, cudaStream_t stream) {
  if (head_dim % 8 != 0 || qkv_row_stride % 8 != 0 || k_offset % 8 != 0 || v_offset % 8 != 0)
    return invalid_argument("kv_append: head_dim, row stride and offsets must be multiples of 8 elements");
  if (batch.num_tokens <= 0) return Status::ok();
  const int64_t total = static_cast<int64_t>(batch.num_tokens) * batch.num_kv_heads * (head_dim / 8) * 2;
  return ops_detail::launch_status(
      "kv_append", launch_dependent(kv_append_kernel, dim3((total + 255) / 256), dim3(256), 0, stream, pool, batch,
                                    layer, qkv, qkv_row_stride, k_offset, v_offset, head_dim));
}

Status kv_gather_rows(const DeviceKvPool& pool, int32_t seq, int32_t layer, int32_t num_layers, int32_t num_kv_heads,
                      int32_t head_dim, const int32_t* lengths, int32_t max_length, __nv_bfloat16* k_out,
                      __nv_bfloat16* v_out, int64_t out_head_stride, cudaStream_t stream) {
  if (head_dim % 8 != 0 || out_head_stride % 8 != 0)
    return invalid_argument("kv_gather_rows: head_dim and the output stride must be multiples of 8");
  if (max_length <= 0) return Status::ok();
  const int64_t total = static_cast<int64_t>(num_kv_heads) * max_length * (head_dim / 8);
  kv_gather_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      pool, seq, layer, num_layers, num_kv_heads, head_dim, lengths, max_length, k_out, v_out, out_head_stride);
  return ops_detail::launch_status("kv_gather_rows");
}

}  // namespace adakv::cuda
