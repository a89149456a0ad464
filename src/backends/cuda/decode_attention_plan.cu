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

// Balanced split (DecodeSplit::kBalanced) over `workers` slots: slot w's share ends where the
// running cost (pages plus item_cost per item) reaches its absolute target, so a slot that stops
// short (the next row's first item would not fit) does not push the excess onto the last one.
void balanced_split(std::span<const int32_t> row_lengths, int64_t workers, int64_t item_cost, int64_t nonempty,
                    int64_t total_pages, std::vector<DecodeWorkItem>* items, std::vector<int32_t>* item_warp) {
  // Each slot starts at most one item beyond those that start rows, so this bounds the cost.
  const int64_t total_cost = total_pages + item_cost * (nonempty + workers - 1);
  const auto target = [&](int64_t w) { return (w + 1) * total_cost / workers; };
  int64_t w = 0, cum = 0;
  for (int32_t r = 0; r < static_cast<int32_t>(row_lengths.size()); ++r) {
    const int32_t pages = pages_of(row_lengths[r]);
    int32_t p = 0;
    while (p < pages) {
      const int64_t room = target(w) - cum - item_cost;
      if (room <= 0 && w < workers - 1) {  // this slot is full: the next one starts the piece
        ++w;
        continue;
      }
      // The last worker takes whatever is left (at most about one share).
      const int32_t take =
          (w == workers - 1) ? pages - p : static_cast<int32_t>(std::min<int64_t>(pages - p, room));
      items->push_back({r, p, p + take, -1});
      item_warp->push_back(static_cast<int32_t>(w));
      cum += take + item_cost;
      p += take;
    }
  }
}

// Row-aligned split (DecodeSplit::kRowAligned) with slots of at most `share` cost: a row whose
// pages and item cost exceed the share gets ceil(pages / share) slots of its own, near-equal
// pieces; shorter rows are packed whole into shared slots, in row order (a long row closes the
// open one). Returns the slots used; fills items / item_warp unless they are null, and *busiest
// (as busiest_slot() counts it) unless it is null.
int64_t aligned_split(std::span<const int32_t> row_lengths, int64_t share, int64_t item_cost,
                      std::vector<DecodeWorkItem>* items, std::vector<int32_t>* item_warp,
                      int64_t* busiest = nullptr) {
  int64_t used = 0, open_cost = -1;  // cost in the open packing slot; -1: none open
  int64_t open_items = 0, worst = 0;
  for (int32_t r = 0; r < static_cast<int32_t>(row_lengths.size()); ++r) {
    const int32_t pages = pages_of(row_lengths[r]);
    if (pages == 0) continue;
    if (pages + item_cost > share) {
      open_cost = -1;
      const int64_t n = (pages + share - 1) / share;
      worst = std::max(worst, (pages + n - 1) / n + item_cost);
      for (int64_t i = 0; i < n; ++i) {
        if (items != nullptr) {
          items->push_back({r, static_cast<int32_t>(pages * i / n), static_cast<int32_t>(pages * (i + 1) / n), -1});
          item_warp->push_back(static_cast<int32_t>(used));
        }
        ++used;
      }
    } else {
      if (open_cost < 0 || open_cost + pages + item_cost > share) {
        open_cost = 0;
        open_items = 0;
        ++used;
      }
      open_cost += pages + item_cost;
      worst = std::max(worst, open_cost + item_cost * open_items++);
      if (items != nullptr) {
        items->push_back({r, 0, pages, -1});
        item_warp->push_back(static_cast<int32_t>(used - 1));
      }
    }
  }
  if (busiest != nullptr) *busiest = worst;
  return used;
}

// The cost of a split's busiest slot: its pages plus item_cost per item, and item_cost again for
// each item after the first (a slot's items run one after the other, each a full latency chain,
// which item_cost alone undercounts). Items are grouped by slot, in slot order.
int64_t busiest_slot(const std::vector<DecodeWorkItem>& items, const std::vector<int32_t>& item_warp,
                     int64_t item_cost) {
  int64_t worst = 0, cost = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const bool first = i == 0 || item_warp[i] != item_warp[i - 1];
    cost = (first ? 0 : cost + item_cost) + items[i].page_end - items[i].page_begin + item_cost;
    worst = std::max(worst, cost);
  }
  return worst;
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
    balanced_split(row_lengths, workers, item_cost, nonempty, plan.total_pages, &plan.items, &item_warp);
    // Aligning pays where a few long rows are each cut into several slots (small batches: up to
    // a few hundred pages per row and slot); with many rows per slot count the balanced split
    // is kept without the search (its host time is on every decode step's path).
    if (options.split == DecodeSplit::kRowAligned &&
        nonempty * std::max<int32_t>(1, options.align_min_slots_per_row) <= workers) {
      // About the smallest share whose aligned split fits the workers: from the mean pages per
      // worker (no smaller share can fit) up in doubling steps until one fits, then bisection to
      // within 1/64 (the slots used fall as the share grows, up to rounding; only shares checked
      // to fit are kept). A share of everything packs all rows into one slot, so the search ends.
      const auto fits = [&](int64_t share) {
        return aligned_split(row_lengths, share, item_cost, nullptr, nullptr) <= workers;
      };
      const int64_t all = plan.total_pages + item_cost * (nonempty + 1) + 1;
      int64_t good = std::max<int64_t>(1, (plan.total_pages + workers - 1) / workers), bad = good - 1;
      for (int64_t step = std::max<int64_t>(1, good / 16); !fits(good); step *= 2) {
        bad = good;
        good = std::min(all, good + step);
      }
      while (good - bad > std::max<int64_t>(1, bad / 64)) {
        const int64_t mid = bad + (good - bad) / 2;
        (fits(mid) ? good : bad) = mid;
      }
      // Rounding rows to whole slots raises the share most where many rows are about a share
      // long; keep the aligned split only where its busiest slot costs no more.
      int64_t aligned_busiest = 0;
      aligned_split(row_lengths, good, item_cost, nullptr, nullptr, &aligned_busiest);
      if (aligned_busiest <= busiest_slot(plan.items, item_warp, item_cost)) {
        plan.items.clear();
        item_warp.clear();
        aligned_split(row_lengths, good, item_cost, &plan.items, &item_warp);
      }
    }
    // Whole rows: where the rows about fill the slots (batch 32 of 8 kv heads: 256 rows for 264
    // block slots), a split that cuts rows to equalise the slots makes partials and a merge
    // kernel for a few percent of balance. Whole rows, packed up to the longest row's cost, take
    // none; they are kept where their busiest slot costs no more than the split's plus the merge.
    if (options.split == DecodeSplit::kRowAligned && nonempty <= workers &&
        plan.items.size() > static_cast<size_t>(nonempty)) {
      int32_t longest = 0;
      for (const int32_t len : row_lengths) longest = std::max(longest, pages_of(len));
      int64_t whole_busiest = 0;
      if (aligned_split(row_lengths, longest + item_cost, item_cost, nullptr, nullptr, &whole_busiest) <= workers &&
          whole_busiest <= busiest_slot(plan.items, item_warp, item_cost) + std::max<int32_t>(0, options.merge_cost_pages)) {
        plan.items.clear();
        item_warp.clear();
        aligned_split(row_lengths, longest + item_cost, item_cost, &plan.items, &item_warp);
      }
    }
  }
  fill_offsets(&plan, item_warp);
  assign_partials(&plan);
  return plan;
}

DecodePlanOptions effective_plan_options(const DecodeAttentionOptions& options, int32_t warps_per_sm) {
  DecodePlanOptions p = options.plan;
  if (options.block_items) p.min_pages_per_warp = 2 * std::max<int32_t>(1, p.min_pages_per_warp);
  // A slot's time per page against the reference (d 128, 8 warps per SM), rounded, at least 1.
  const int64_t den = int64_t{std::max<int32_t>(1, options.head_dim)} * std::max<int32_t>(1, warps_per_sm);
  const int32_t scale = static_cast<int32_t>(std::max<int64_t>(1, (128 * 8 + den / 2) / den));
  p.item_cost_pages *= scale;
  p.merge_cost_pages *= scale;
  return p;
}

int32_t longest_split_row(const DecodePlan& plan) {
  int32_t most = 0;
  for (const DecodeRowMerge& m : plan.row_merge) most = std::max(most, m.partial_count);
  return most;
}

DecodeMerge auto_merge(const DecodeAttentionOptions& options, const DecodePlan& plan, int32_t sms) {
  if (options.merge != DecodeMerge::kAuto) return options.merge;
  // The merge kernel has a block per (row, query head of the group); beyond one per SM they are
  // not resident before the attention blocks leave.
  const int64_t group = std::max<int32_t>(1, options.num_qo_heads / std::max<int32_t>(1, options.num_kv_heads));
  const bool crowded = int64_t{plan.num_rows} * group > sms;
  const int32_t fuse_up_to = crowded ? options.fused_max_partials_crowded : options.fused_max_partials;
  return longest_split_row(plan) <= fuse_up_to ? DecodeMerge::kFused : DecodeMerge::kKernel;
}

}  // namespace adakv::cuda
