// In-place compaction of per-head pages (compact_kv.h). One block of 512 threads per row; each
// thread carries up to 8 16-byte pieces of a chunk (128 entries at head_dim 128, 256 at 64) from
// the read phase to the write phase in registers. Identity moves (keep[i] == i) are skipped.
#include "backends/cuda/compact_kv.h"

#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/paged_kv_view.h"
#include "backends/cuda/score_common.cuh"

namespace adakv::cuda {

namespace compact_detail {

constexpr int kThreads = 512;
constexpr int kVecsPerThread = 8;

struct RowView {
  const int32_t* pages;  // the row's pool pages
  int64_t page_stride;
  int32_t head_dim;

  __device__ __forceinline__ int64_t slot(int entry) const {
    return static_cast<int64_t>(pages[entry / kPageSize]) * kPageSize + entry % kPageSize;
  }
  // Element offset of 16-byte piece `part` of an entry: parts [0, d/8) are K, [d/8, d/4) are V.
  __device__ __forceinline__ int64_t element(int entry, int part, int half) const {
    const int piece = part < half ? part : part - half;
    return static_cast<int64_t>(pages[entry / kPageSize]) * page_stride +
           static_cast<int64_t>(entry % kPageSize) * head_dim + piece * 8;
  }
};

__global__ void __launch_bounds__(kThreads) compact_rows_kernel(const KvCompactParams p) {
  const int row = blockIdx.x;
  const int count = p.keep_counts[row];
  const int32_t* keep = p.keep + (p.keep_offsets != nullptr ? static_cast<int64_t>(p.keep_offsets[row]) : row * p.keep_stride);
  const RowView view{p.page_ids + p.row_page_offsets[row], p.page_stride, p.head_dim};
  const int half = p.head_dim / 8;  // 16-byte pieces of K (and of V) per entry
  const int per_entry = 2 * half;
  const int chunk = min(static_cast<int>(blockDim.x), static_cast<int>(blockDim.x) * kVecsPerThread / per_entry);
  const int pieces = chunk * per_entry;

  for (int c0 = 0; c0 < count; c0 += chunk) {
    uint4 reg[kVecsPerThread];
    int32_t pos = 0;
    float met = 0.0f;
    // Read phase: every source of the chunk.
#pragma unroll
    for (int u = 0; u < kVecsPerThread; ++u) {
      const int v = threadIdx.x + u * blockDim.x;
      const int e = c0 + v / per_entry;
      if (v >= pieces || e >= count) continue;
      const int src = keep[e];
      if (src == e) continue;
      const int part = v % per_entry;
      const __nv_bfloat16* base = part < half ? p.k_pool : p.v_pool;
      reg[u] = *reinterpret_cast<const uint4*>(base + view.element(src, part, half));
    }
    const int my_entry = c0 + static_cast<int>(threadIdx.x);
    const bool my_move = static_cast<int>(threadIdx.x) < chunk && my_entry < count && keep[my_entry] != my_entry;
    if (my_move) {
      const int64_t s = view.slot(keep[my_entry]);
      if (p.positions != nullptr) pos = p.positions[s];
      if (p.metric != nullptr) met = p.metric[s];
    }
    __syncthreads();
    // Write phase: every destination of the chunk.
#pragma unroll
    for (int u = 0; u < kVecsPerThread; ++u) {
      const int v = threadIdx.x + u * blockDim.x;
      const int e = c0 + v / per_entry;
      if (v >= pieces || e >= count) continue;
      if (keep[e] == e) continue;
      const int part = v % per_entry;
      __nv_bfloat16* base = part < half ? p.k_pool : p.v_pool;
      *reinterpret_cast<uint4*>(base + view.element(e, part, half)) = reg[u];
    }
    if (my_move) {
      const int64_t d = view.slot(my_entry);
      if (p.positions != nullptr) p.positions[d] = pos;
      if (p.metric != nullptr) p.metric[d] = met;
    }
    __syncthreads();
  }
}

}  // namespace compact_detail

Status compact_kv_rows(const KvCompactParams& p, cudaStream_t stream) {
  const std::string where = "compact_kv_rows: ";
  if (p.num_rows < 0) return invalid_argument(where + "num_rows must be >= 0");
  if (p.num_rows == 0) return Status::ok();
  if (p.head_dim < 8 || p.head_dim % 8 != 0 || p.head_dim > 8 * compact_detail::kThreads)
    return invalid_argument(where + "head_dim must be a positive multiple of 8");
  if (p.k_pool == nullptr || p.v_pool == nullptr || p.row_page_offsets == nullptr || p.page_ids == nullptr ||
      p.keep == nullptr || p.keep_counts == nullptr)
    return invalid_argument(where + "null pointer");
  if (reinterpret_cast<uintptr_t>(p.k_pool) % 16 != 0 || reinterpret_cast<uintptr_t>(p.v_pool) % 16 != 0 ||
      p.page_stride % 8 != 0 || p.page_stride < static_cast<int64_t>(kPageSize) * p.head_dim)
    return invalid_argument(where + "pools need 16-byte alignment and a page stride that is a multiple of 8");
  ADAKV_CUDA_RETURN_IF_ERROR(score_detail::launch(compact_detail::compact_rows_kernel, dim3(p.num_rows),
                                                  dim3(compact_detail::kThreads), 0, stream, p));
  return Status::ok();
}

}  // namespace adakv::cuda
