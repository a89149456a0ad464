#include "compress/kvcompress.h"

#include <algorithm>
#include <numeric>

#include "core/check.h"

namespace adakv {

std::vector<int32_t> kvcompress_eviction_order(const KvCompressRow& row, int64_t logical_length,
                                               int32_t protected_window) {
  ADAKV_CHECK(row.metric.size() == row.positions.size(), "metric and positions differ in length");
  const int64_t first_protected = logical_length - protected_window;
  std::vector<int32_t> order;
  for (size_t i = 0; i < row.metric.size(); ++i)
    if (row.positions[i] < first_protected) order.push_back(static_cast<int32_t>(i));
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const float ma = row.metric[static_cast<size_t>(a)], mb = row.metric[static_cast<size_t>(b)];
    if (ma != mb) return ma < mb;
    return row.positions[static_cast<size_t>(a)] > row.positions[static_cast<size_t>(b)];
  });
  return order;
}

namespace {

// Entries freed by the row's first block: the part of the last page in use.
int32_t hanging_entries(int64_t n, int32_t block_size) {
  if (n == 0) return 0;
  const int32_t r = static_cast<int32_t>(n % block_size);
  return r == 0 ? block_size : r;
}

std::vector<float> block_costs_from_order(const KvCompressRow& row, std::span<const int32_t> order, int32_t block_size) {
  const int64_t n = static_cast<int64_t>(row.metric.size());
  const int32_t hanging = hanging_entries(n, block_size);
  std::vector<float> costs;
  if (n == 0) return costs;
  for (int64_t k = 1;; ++k) {
    const int64_t idx = (k - 1) * block_size + hanging - 1;
    if (idx >= static_cast<int64_t>(order.size())) break;  // would evict a protected entry
    costs.push_back(row.metric[static_cast<size_t>(order[static_cast<size_t>(idx)])]);
  }
  return costs;
}

}  // namespace

std::vector<float> kvcompress_block_costs(const KvCompressRow& row, int32_t block_size, int64_t logical_length,
                                          int32_t protected_window) {
  ADAKV_CHECK(block_size >= 1, "block size must be >= 1");
  const std::vector<int32_t> order = kvcompress_eviction_order(row, logical_length, protected_window);
  return block_costs_from_order(row, order, block_size);
}

std::vector<std::vector<int32_t>> kvcompress_select(std::span<const KvCompressRow> rows, int64_t max_entries,
                                                    int32_t block_size, int64_t logical_length,
                                                    int32_t protected_window) {
  ADAKV_CHECK(block_size >= 1, "block size must be >= 1");
  std::vector<std::vector<int32_t>> orders(rows.size());
  struct Block {
    float cost;
    int32_t row;
    int32_t k;  // 1-based
  };
  std::vector<Block> blocks;
  int64_t total = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    total += static_cast<int64_t>(rows[r].metric.size());
    orders[r] = kvcompress_eviction_order(rows[r], logical_length, protected_window);
    const std::vector<float> costs = block_costs_from_order(rows[r], orders[r], block_size);
    for (size_t k = 0; k < costs.size(); ++k) blocks.push_back({costs[k], static_cast<int32_t>(r), static_cast<int32_t>(k + 1)});
  }
  std::sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) {
    if (a.cost != b.cost) return a.cost < b.cost;
    if (a.row != b.row) return a.row > b.row;
    return a.k < b.k;
  });
  // A row's costs never decrease with k, and ties go to the lower k, so the sorted list frees
  // every row's blocks in order.
  std::vector<int32_t> freed(rows.size(), 0);
  for (const Block& b : blocks) {
    if (total <= max_entries) break;
    ADAKV_CHECK(freed[static_cast<size_t>(b.row)] == b.k - 1, "blocks of a row freed out of order");
    const int64_t n = static_cast<int64_t>(rows[static_cast<size_t>(b.row)].metric.size());
    total -= b.k == 1 ? hanging_entries(n, block_size) : block_size;
    freed[static_cast<size_t>(b.row)] = b.k;
  }
  std::vector<std::vector<int32_t>> evict(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    if (freed[r] == 0) continue;
    const int64_t count = static_cast<int64_t>(freed[r] - 1) * block_size + hanging_entries(static_cast<int64_t>(rows[r].metric.size()), block_size);
    evict[r].assign(orders[r].begin(), orders[r].begin() + count);
  }
  return evict;
}

}  // namespace adakv
