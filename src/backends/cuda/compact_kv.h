// Compaction of per-head pages on the GPU: apply keep lists to rows of the device KV pool in
// place, in one launch for any number of rows (all rows of a layer, or of several layers when they
// share the pool). Entry keep[r][i] of row r moves to entry i, for i < keep_counts[r]: K, V (bf16,
// pool layout of paged_kv_view.h), and when given the int32 token position and fp32 metric of
// each slot. These are exactly the moves KvCacheManager::keep_entries returns, applied in its
// order; the result is bit-identical to CpuKvStorage::apply of those moves. The kernel touches no
// page table: the host manager frees the trailing pages (keep_entries already did).
//
// Why in order matters: a kept entry's source may be another kept entry's destination
// (keep = [1, 3]: 1 -> 0, then 3 -> 1). One block per row moves chunks of entries in increasing
// order, each chunk read completely before any of it is written; since keep[i] >= i, no chunk
// writes a slot that a later chunk still has to read, and earlier chunks have read theirs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/status.h"

namespace adakv::cuda {

struct KvCompactParams {
  __nv_bfloat16* k_pool = nullptr;  // [num_pages] pages of [kPageSize][head_dim]
  __nv_bfloat16* v_pool = nullptr;  // same layout
  int64_t page_stride = 0;          // elements from one page to the next (as PagedKvView)
  int32_t head_dim = 0;             // multiple of 8
  int32_t* positions = nullptr;     // [num_pages * kPageSize] token position per slot, or nullptr
  float* metric = nullptr;          // [num_pages * kPageSize] per-slot metric, or nullptr
  const int32_t* row_page_offsets = nullptr;  // [num_rows + 1] CSR offsets into page_ids
  const int32_t* page_ids = nullptr;          // pool page of each row page
  int32_t num_rows = 0;
  const int32_t* keep = nullptr;         // [num_rows][keep_stride] strictly ascending entry indices < row length
  int64_t keep_stride = 0;
  const int32_t* keep_counts = nullptr;  // [num_rows]
  // Optional: row r's list at keep + keep_offsets[r] instead of keep + r * keep_stride (ragged
  // lists, e.g. KV-Compress's evict moves as keep lists: keep[i] = i, or the tail survivor that
  // fills hole i; every source then lies at or beyond the new length, so the order argument holds).
  const int32_t* keep_offsets = nullptr;
};

// Asynchronous on `stream`. Pool pointers 16-byte aligned, page_stride a multiple of 8.
Status compact_kv_rows(const KvCompactParams& params, cudaStream_t stream);

}  // namespace adakv::cuda
