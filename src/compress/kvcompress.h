// KV-Compress cross-layer block-granular eviction (method.md 2.4): one entry budget per sequence
// shared by every (layer, kv head) row; the cheapest blocks go first.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace adakv {

// One (layer, kv head) row as the selection sees it.
struct KvCompressRow {
  std::span<const float> metric;      // [n] cumulative metric of each entry
  std::span<const int32_t> positions;  // [n] token position of each entry
};

// A row's entries in eviction order: metric ascending, ties: higher position first (the mirror
// of the keep order "higher score, then lower position"). Protected entries (position >=
// logical_length - protected_window) are left out.
std::vector<int32_t> kvcompress_eviction_order(const KvCompressRow& row, int64_t logical_length,
                                               int32_t protected_window);

// Cost of freeing the row's k-th block (k = 1, 2, ...), for every block that can be freed:
// cost_k = metric at sorted index (k-1)*bs + hanging - 1 of the eviction order, hanging = entries in
// the last block (n mod bs, or bs when n is a multiple). Blocks that would reach a protected
// entry cost infinity and are not listed.
std::vector<float> kvcompress_block_costs(const KvCompressRow& row, int32_t block_size, int64_t logical_length,
                                          int32_t protected_window);

// Frees the cheapest blocks of all rows together until the sequence holds at most `max_entries`
// entries (or nothing more can be freed). Global order: cost ascending, then the higher row
// index first (rows are numbered layer * Hkv + head, so lower heads keep ties), then block k
// ascending. Returns [rows] the entry indices to evict from each row (any order), i.e. the
// first (k_r - 1) * bs + hanging_r entries of its eviction order, k_r = blocks freed.
std::vector<std::vector<int32_t>> kvcompress_select(std::span<const KvCompressRow> rows, int64_t max_entries,
                                                    int32_t block_size, int64_t logical_length,
                                                    int32_t protected_window);

}  // namespace adakv
