// Host planner of decode attention (see decode_attention.h). Pure host code; it lives in a .cu
// file so that it belongs to the CUDA kernel library, which builds without adakv_lib's
// third-party dependencies (see src/backends/cuda/CMakeLists.txt).
#include <algorithm>
#include <string>

#include "backends/cuda/decode_attention.h"

namespace adakv::cuda {
namespace {

int32_t pages_of(int32_t length) { return (length + kPageSize - 1) / kPageSize; }

// Gives every row with more than one piece consecutive partial slots, in page order.
void assign_partials(DecodePlan* plan) {
  std::vector<int32_t> pieces(plan->num_rows, 0);
  for (const DecodeWorkItem& it : plan->items) ++pieces[it.row];
  // Items of one row are consecutive in the item list (rows are walked in order), so a running
  // counter hands out contiguous ranges.
  int32_t next = 0;
  for (int32_t r = 0; r < plan->num_rows; ++r) {
    if (pieces[r] == 0) {
      plan->row_merge[r] = {0, 0};
    } else if (pieces[r] == 1) {
      plan->row_merge[r] = {0, -1};
    } else {
      plan->row_merge[r] = {next, 0};
      next += pieces[r];
    }
  }
  for (DecodeWorkItem& it : plan->items) {
    DecodeRowMerge& m = plan->row_merge[it.row];
    if (m.partial_count == -1) {
      it.partial = -1;
    } else {
      it.partial = m.partial_begin + m.partial_count;
      ++m.partial_count;
    }
  }
  plan->num_partials = next;
}

void fill_offsets(DecodePlan* plan, const std::vector<int32_t>& item_warp) {
  plan->warp_item_offsets.assign(static_cast<size_t>(plan->num_warps) + 1, 0);
  for (int32_t w : item_warp) ++plan->warp_item_offsets[w + 1];
  for (int32_t w = 0; w < plan->num_warps; ++w) plan->warp_item_offsets[w + 1] += plan->warp_item_offsets[w];
}

}  // namespace

Expected<DecodePlan> decode_attention_plan(std::span<const int32_t> row_lengths,
                                           int32_t num_warp_slots, const DecodePlanOptions& options) {
  if (row_lengths.size() > (1u << 29))
    return invalid_argument("decode_attention_plan: " + std::to_string(row_lengths.size()) + " rows is too many");
  if (num_warp_slots < 1) return invalid_argument("decode_attention_plan: no warp slots");
  DecodePlan plan;
  plan.num_rows = static_cast<int32_t>(row_lengths.size());
  plan.row_merge.assign(row_lengths.size(), {});
  int64_t nonempty = 0;
  for (size_t r = 0; r < row_lengths.size(); ++r) {
    if (row_lengths[r] < 0)
      return invalid_argument("decode_attention_plan: row " + std::to_string(r) + " has negative length " +
                              std::to_string(row_lengths[r]));
    plan.total_pages += pages_of(row_lengths[r]);
    nonempty += row_lengths[r] > 0;
  }
  std::vector<int32_t> item_warp;  // [items] warp of each item

  if (options.split == DecodeSplit::kOneBlockPerRow) {
    plan.num_warps = plan.num_rows * kDecodeWarpsPerBlock;
    for (int32_t r = 0; r < plan.num_rows; ++r) {
      const int32_t pages = pages_of(row_lengths[r]);
      const int32_t pieces = std::min<int32_t>(pages, kDecodeWarpsPerBlock);
      for (int32_t i = 0; i < pieces; ++i) {
        const int32_t b = static_cast<int32_t>(int64_t{pages} * i / pieces);
        const int32_t e = static_cast<int32_t>(int64_t{pages} * (i + 1) / pieces);
        plan.items.push_back({r, b, e, -1});
        item_warp.push_back(r * kDecodeWarpsPerBlock + i);
      }
    }
  } else {
    plan.num_warps = num_warp_slots;
    const int64_t min_pages = std::max<int32_t>(1, options.min_pages_per_warp);
    const int64_t item_cost = std::max<int32_t>(0, options.item_cost_pages);
    // Warps that get work; the rest of the slots get empty ranges (the grid stays fixed).
    const int64_t workers =
        std::max<int64_t>(1, std::min<int64_t>(num_warp_slots, (plan.total_pages + min_pages - 1) / min_pages));
    // Each warp starts at most one item beyond those that start rows, so this bounds the cost.
    const int64_t total_cost = plan.total_pages + item_cost * (nonempty + workers - 1);
    // Warp w's share ends where the running cost reaches its absolute target, so a warp that
    // stops short (the next row's first item would not fit) does not push the excess onto the
    // last warp.
    const auto target = [&](int64_t w) { return (w + 1) * total_cost / workers; };
    int64_t w = 0, cum = 0;
    for (int32_t r = 0; r < plan.num_rows; ++r) {
      const int32_t pages = pages_of(row_lengths[r]);
      int32_t p = 0;
      while (p < pages) {
        const int64_t room = target(w) - cum - item_cost;
        if (room <= 0 && w < workers - 1) {  // this warp is full: the next one starts the piece
          ++w;
          continue;
        }
        // The last worker takes whatever is left (at most about one share).
        const int32_t take = (w == workers - 1) ? pages - p
                                                : static_cast<int32_t>(std::min<int64_t>(pages - p, room));
        plan.items.push_back({r, p, p + take, -1});
        item_warp.push_back(static_cast<int32_t>(w));
        cum += take + item_cost;
        p += take;
      }
    }
  }
  fill_offsets(&plan, item_warp);
  assign_partials(&plan);
  return plan;
}

}  // namespace adakv::cuda
