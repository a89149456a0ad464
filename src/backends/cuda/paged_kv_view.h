// PagedKvView: what a kernel sees of the per-head paged KV cache for ONE layer. A plain struct,
// passed by value as a kernel parameter (no pointers to host memory, nothing to free).
//
// FlashInfer's CSR page table, with rows = (sequence, kv head) instead of sequences:
//   row r = seq * num_kv_heads + kv_head
//   the pages of row r are page_ids[row_page_offsets[r] .. row_page_offsets[r + 1])
//   entry i of row r lives in page page_ids[row_page_offsets[r] + i / kPageSize], slot i % kPageSize
//   row_lengths[r] entries are valid; the unused tail of the last page may hold anything (the
//   kernels mask it, NaN included).
// Positions are not here: decode attention sees every cached entry of a row, and RoPE was
// applied to K when it was written.
//
// Pool: K and V are separate arrays of pages, each page [kPageSize][head_dim] bf16 with rows of
// head_dim contiguous elements; `page_stride` (elements) separates consecutive pages, so K and V
// may also interleave in one allocation ([num_pages][2][kPageSize][head_dim]: page_stride =
// 2 * kPageSize * head_dim, v_pool = k_pool + kPageSize * head_dim).
// Alignment: pool pointers and page_stride * 2 bytes must be multiples of 16 bytes.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace adakv::cuda {

inline constexpr int kPageSize = 16;  // entries per page; the kernels are written for 16

struct PagedKvView {
  const __nv_bfloat16* k_pool = nullptr;  // [num_pages] pages of [kPageSize][head_dim]
  const __nv_bfloat16* v_pool = nullptr;  // [num_pages] pages of [kPageSize][head_dim]
  const int32_t* row_page_offsets = nullptr;  // [num_rows + 1] CSR offsets into page_ids
  const int32_t* page_ids = nullptr;          // [row_page_offsets[num_rows]] pool page of each row page
  const int32_t* row_lengths = nullptr;       // [num_rows] valid entries of each row
  int32_t num_rows = 0;                       // num_seqs * num_kv_heads
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int64_t page_stride = 0;  // elements from one page to the next (>= kPageSize * head_dim)
};

}  // namespace adakv::cuda
