// Per-entry metrics on the device (H2O accumulated attention, the KV-Compress metric) and the
// KV-Compress cross-layer block selection (method.md 1.2, 2.4). The metric lives in a slot-indexed
// fp32 array next to the KV pool ([num_pages * kPageSize], like the positions), so compaction
// (compact_kv_rows with `metric`) moves it with its entry.
//
//   metric_scatter_rows   values [rows][stride] -> metric[slot of (row, i)], i < length
//   metric_add_rows       metric[slot of (row, i)] += values [rows][stride] (a chunk's H2O share)
//   metric_gather_rows    metric[slot of (row, i)] -> out [rows][stride]
//   metric_decode_add     one decode query per row: metric[slot(row, i)] += reduce_g p[g][i]
//                         (H2O: mean | max over the group; KV-Compress: sum of p^2), fp64 per entry
//                         as KvCompressor::add_attention, fp32 logits; with the attention's lse one
//                         pass (each key read once for the whole group), else a statistics pass
//                         first (one block per row)
//   KvcSelector           KV-Compress: every row's entries sorted by (metric asc, position desc),
//                         protected entries last (one 64-bit radix sort over the sequence); block
//                         costs; the global block order (cost asc, row desc, k asc; a second sort);
//                         the prefix freed until the sequence holds <= max_entries (a scan); per row
//                         the blocks freed. Identical to kvcompress_select on the same metrics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/status.h"

namespace adakv::cuda {

// Rows of one sequence (or of a decode batch) in the page-table mirror.
struct MetricRows {
  const int32_t* page_ids = nullptr;          // the page-table mirror
  const int32_t* row_page_offsets = nullptr;  // [num_rows] offset of each row's page list in page_ids
  int32_t num_rows = 0;
};

Status metric_scatter_rows(const MetricRows& rows, const float* values, int64_t stride, int32_t length, float* metric,
                           cudaStream_t stream);
Status metric_add_rows(const MetricRows& rows, const float* values, int64_t stride, int32_t length, float* metric,
                       cudaStream_t stream);
Status metric_gather_rows(const MetricRows& rows, const float* metric, int32_t length, float* out, int64_t stride,
                          cudaStream_t stream);

struct MetricDecodeParams {
  const __nv_bfloat16* k_pool = nullptr;
  int64_t page_stride = 0;
  int32_t head_dim = 0;                       // multiple of 8, <= 256
  MetricRows rows;                            // row r = b * Hkv + kv head, b = decode token b
  const int32_t* row_lengths = nullptr;       // [num_rows] entries (the new token included)
  const __nv_bfloat16* queries = nullptr;     // token b's queries at queries + b * q_token_stride: [H][d]
  int64_t q_token_stride = 0;
  int32_t num_kv_heads = 0;
  int32_t group = 1;                          // <= 64
  float scale = 0.f;
  int32_t mode = 0;                           // 0: mean over the group, 1: max, 2: sum of p^2 (KV-Compress)
  float* metric = nullptr;
  // Optional: the decode attention's log-sum-exp of these queries over these rows (natural log;
  // token b's query head h at lse[b * lse_token_stride + h]), which spares the statistics pass:
  // each key is then read once for all g heads. max_length: the longest row (sizes the grid).
  const float* lse = nullptr;
  int64_t lse_token_stride = 0;
  int32_t max_length = 0;
};
Status metric_decode_add(const MetricDecodeParams& p, cudaStream_t stream);

// H2O's continual plan on the device (plan_layer of compress/policy.h with uniform allocation,
// one stage), every row of a sequence in one launch: row r of length len keeps the top
//   b = clamp(selection_budget, 0, n),  n = max(0, len - window)
// of its first n entries by metric (ties: the lower index), in ascending order, then its last
// len - n entries (the window). keep [rows][keep_stride] (>= the longest row), counts [rows]: the
// kept count of a row that loses entries, 0 for a row kept whole (nothing to move). Rows of at
// most kMetricKeepMaxRow entries.
inline constexpr int32_t kMetricKeepMaxRow = 4096;
struct MetricKeepParams {
  MetricRows rows;
  const int32_t* row_lengths = nullptr;  // [num_rows] (device)
  const float* metric = nullptr;
  int32_t window = 0;
  int32_t selection_budget = 0;
  int32_t* keep = nullptr;
  int64_t keep_stride = 0;
  int32_t* counts = nullptr;
};
Status metric_keep_top(const MetricKeepParams& p, cudaStream_t stream);

class KvcSelector {
 public:
  // max_entries: the most entries of one sequence selected at once; max_rows: rows per sequence.
  static Expected<std::unique_ptr<KvcSelector>> create(int64_t max_entries, int32_t max_rows);
  ~KvcSelector();
  KvcSelector(const KvcSelector&) = delete;
  KvcSelector& operator=(const KvcSelector&) = delete;

  // lengths [rows] (host); page lists through `rows`; metric and positions slot-indexed. Fills
  // evict[r] with the entry indices to evict from row r (the first freed entries of its eviction
  // order), as kvcompress_select. Synchronises `stream` (the host needs the counts).
  Status select(const MetricRows& rows, const std::vector<int32_t>& lengths, const float* metric,
                const int32_t* positions, int64_t max_entries, int32_t block_size, int64_t logical_length,
                int32_t protected_window, cudaStream_t stream, std::vector<std::vector<int32_t>>* evict);

 private:
  KvcSelector() = default;
  int64_t cap_ = 0;
  int32_t max_rows_ = 0;
  void* workspace_ = nullptr;
  size_t temp_bytes_ = 0;
  void* temp_ = nullptr;
  uint64_t* keys_ = nullptr;      // [cap]
  uint64_t* keys_out_ = nullptr;  // [cap]
  int32_t* vals_ = nullptr;       // [cap]
  int32_t* vals_out_ = nullptr;   // [cap]
  int32_t* sizes_ = nullptr;      // [cap] block sizes, then their exclusive sum in scan_
  int32_t* scan_ = nullptr;       // [cap]
  int32_t* row_base_ = nullptr;   // [max_rows + 1]
  int32_t* unprot_ = nullptr;     // [max_rows]
  int32_t* block_base_ = nullptr; // [max_rows + 1]
  int32_t* freed_ = nullptr;      // [max_rows]
  int32_t* host_ = nullptr;       // pinned: [max_rows + 1] staging
};

}  // namespace adakv::cuda
