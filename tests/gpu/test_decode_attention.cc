// Decode attention over per-head pages (src/backends/cuda/decode_attention.h):
//   - the host planner (no GPU needed): every page of every row in exactly one work item, rows
//     split into consecutive partials, warps balanced within one item's cost;
//   - the kernels against a CPU fp64 reference computed from the same bf16 values, on fresh random
//     data each run (seed printed; ADAKV_TEST_SEED reproduces a run): row lengths 0, 1, 15, 16,
//     17, ... and long skewed rows, shuffled page ids, NaN in the unused tail of every last page,
//     output poisoned before each run and every element checked; the merge of split rows both by
//     the merge kernel and fused into the attention kernel (last-arriving warp of a row).
// Without a CUDA device the GPU cases skip with a message. Built with GoogleTest, or with its own
// main() (ADAKV_PLAIN_TEST_MAIN) on a machine that has no GoogleTest libraries.
#include "gpu_check_harness.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#if ADAKV_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <sstream>

#include "backends/cuda/decode_attention.h"
#include "backends/cuda/decode_attention_kernels.h"
#include "device_array.h"
#include "core/dtype.h"

namespace {

using adakv::bf16_to_f32;
using adakv::f32_to_bf16;
using adakv::cuda::DecodeAttention;
using adakv::cuda::DecodeAttentionOptions;
using adakv::cuda::DecodePlan;
using adakv::cuda::DecodePlanOptions;
using adakv::cuda::DecodeSplit;
using adakv::cuda::kPageSize;
using adakv::cuda::PagedKvView;

uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("ADAKV_TEST_SEED")) return std::strtoull(s, nullptr, 10);
    return (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  }();
  return seed;
}

std::string gpu_unavailable() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no CUDA device (cudaGetDeviceCount: ") + cudaGetErrorName(err) + ")";
  }
  if (n == 0) return "no CUDA device";
  return "";
}

int32_t pages_of(int32_t len) { return (len + kPageSize - 1) / kPageSize; }

// --- planner checks (host only) ------------------------------------------------------------------

// Returns the first violated property of `plan` for `lengths`, or "".
std::string plan_problem(const DecodePlan& plan, const std::vector<int32_t>& lengths, const DecodePlanOptions& opt,
                         int32_t slots) {
  std::ostringstream err;
  const int32_t rows = static_cast<int32_t>(lengths.size());
  if (plan.num_rows != rows) return "num_rows mismatch";
  if (static_cast<int32_t>(plan.warp_item_offsets.size()) != plan.num_warps + 1) return "offsets size";
  if (plan.warp_item_offsets.front() != 0 || plan.warp_item_offsets.back() != static_cast<int32_t>(plan.items.size()))
    return "offsets do not span the items";
  for (int32_t w = 0; w < plan.num_warps; ++w)
    if (plan.warp_item_offsets[w] > plan.warp_item_offsets[w + 1]) return "offsets not monotone";
  // Items of a row: consecutive, tiling [0, pages) in order.
  std::vector<int32_t> first_item(rows, -1), next_page(rows, 0), seen(rows, 0);
  int32_t prev_row = -1;
  for (size_t i = 0; i < plan.items.size(); ++i) {
    const auto& it = plan.items[i];
    if (it.row < 0 || it.row >= rows) return "item row out of range";
    if (it.row != prev_row && first_item[it.row] >= 0) {
      err << "row " << it.row << " items not consecutive";
      return err.str();
    }
    if (first_item[it.row] < 0) first_item[it.row] = static_cast<int32_t>(i);
    prev_row = it.row;
    if (it.page_begin != next_page[it.row] || it.page_end <= it.page_begin) {
      err << "row " << it.row << " piece [" << it.page_begin << ", " << it.page_end << ") does not continue at "
          << next_page[it.row];
      return err.str();
    }
    next_page[it.row] = it.page_end;
    ++seen[it.row];
  }
  std::vector<int32_t> partial_used(plan.num_partials, 0);
  for (int32_t r = 0; r < rows; ++r) {
    if (next_page[r] != pages_of(lengths[r])) {
      err << "row " << r << " covers " << next_page[r] << " of " << pages_of(lengths[r]) << " pages";
      return err.str();
    }
    const auto& m = plan.row_merge[r];
    if (seen[r] == 0 && m.partial_count != 0) return "empty row not marked empty";
    if (seen[r] == 1 && (m.partial_count != -1 || plan.items[first_item[r]].partial != -1))
      return "single-piece row not written directly";
    if (seen[r] >= 2) {
      if (m.partial_count != seen[r]) return "partial count differs from the pieces";
      for (int32_t k = 0; k < seen[r]; ++k) {
        const int32_t p = plan.items[first_item[r] + k].partial;
        if (p != m.partial_begin + k) return "partials not consecutive in page order";
        if (p < 0 || p >= plan.num_partials || partial_used[p]++) return "partial reused or out of range";
      }
    }
  }
  for (int32_t p = 0; p < plan.num_partials; ++p)
    if (!partial_used[p]) return "partial slot unused";
  // Balance: no warp's cost (pages + item cost per item) above the mean by more than an item.
  if (opt.split == DecodeSplit::kBalanced) {
    if (plan.num_warps != slots) return "balanced plan does not use the warp slots";
    int64_t total_cost = 0, worst = 0;
    for (int32_t w = 0; w < plan.num_warps; ++w) {
      int64_t cost = 0;
      for (int32_t i = plan.warp_item_offsets[w]; i < plan.warp_item_offsets[w + 1]; ++i)
        cost += plan.items[i].page_end - plan.items[i].page_begin + opt.item_cost_pages;
      total_cost += cost;
      worst = std::max(worst, cost);
    }
    const int64_t want_workers =
        std::min<int64_t>(slots, std::max<int64_t>(1, (plan.total_pages + opt.min_pages_per_warp - 1) /
                                                          std::max(1, opt.min_pages_per_warp)));
    if (plan.total_pages > 0) {
      const int64_t bound = (total_cost + want_workers - 1) / want_workers + 2 * opt.item_cost_pages + 1;
      if (worst > bound) {
        err << "worst warp cost " << worst << " above bound " << bound;
        return err.str();
      }
    }
  } else if (opt.split == DecodeSplit::kRowAligned) {
    // Either the balanced plan itself (fewer than 4 slots per non-empty row, or the aligned one
    // would load its busiest slot more), or no slot holds a piece of a split row beside anything
    // else and its busiest slot costs no more than the balanced plan's (pages + item cost per item
    // + item cost per item after a slot's first: they run one after the other), or more by up to
    // the merge's cost where no row is split (whole rows: no partials, no merge).
    if (plan.num_warps != slots) return "row-aligned plan does not use the warp slots";
    DecodePlanOptions bal = opt;
    bal.split = DecodeSplit::kBalanced;
    auto balanced = adakv::cuda::decode_attention_plan(lengths, slots, bal);
    if (!balanced) return "balanced plan failed";
    const auto busiest = [&](const DecodePlan& p) {
      int64_t worst = 0;
      for (int32_t w = 0; w < p.num_warps; ++w) {
        const int32_t n = p.warp_item_offsets[w + 1] - p.warp_item_offsets[w];
        int64_t cost = n > 0 ? int64_t{opt.item_cost_pages} * (2 * n - 1) : 0;
        for (int32_t i = p.warp_item_offsets[w]; i < p.warp_item_offsets[w + 1]; ++i)
          cost += p.items[i].page_end - p.items[i].page_begin;
        worst = std::max(worst, cost);
      }
      return worst;
    };
    bool same = balanced->items.size() == plan.items.size() && balanced->warp_item_offsets == plan.warp_item_offsets;
    for (size_t i = 0; same && i < plan.items.size(); ++i)
      same = balanced->items[i].row == plan.items[i].row && balanced->items[i].page_begin == plan.items[i].page_begin &&
             balanced->items[i].page_end == plan.items[i].page_end;
    if (!same) {
      for (int32_t w = 0; w < plan.num_warps; ++w) {
        const int32_t b = plan.warp_item_offsets[w], e = plan.warp_item_offsets[w + 1];
        for (int32_t i = b; i < e; ++i)
          if (e - b > 1 && plan.items[i].partial >= 0) return "row-aligned plan: a split row's piece shares its slot";
      }
      const int64_t allowed = busiest(*balanced) + (plan.num_partials == 0 ? opt.merge_cost_pages : 0);
      if (busiest(plan) > allowed) {
        err << "row-aligned plan's busiest slot costs " << busiest(plan) << ", the balanced one's " << busiest(*balanced)
            << (plan.num_partials == 0 ? " (whole rows)" : "");
        return err.str();
      }
    }
  } else {
    if (plan.num_warps != rows * adakv::cuda::kDecodeWarpsPerBlock) return "one-block plan warp count";
    for (int32_t w = 0; w < plan.num_warps; ++w)
      for (int32_t i = plan.warp_item_offsets[w]; i < plan.warp_item_offsets[w + 1]; ++i)
        if (plan.items[i].row != w / adakv::cuda::kDecodeWarpsPerBlock) return "one-block plan: warp off its row";
  }
  return "";
}

std::vector<int32_t> random_lengths(std::mt19937_64& rng, int rows, int kind) {
  std::vector<int32_t> len(rows);
  std::uniform_int_distribution<int> small(0, 40), mid(1, 3000);
  std::lognormal_distribution<double> skew(5.0, 1.6);
  for (int r = 0; r < rows; ++r) {
    switch (kind) {
      case 0: len[r] = small(rng); break;
      case 1: len[r] = mid(rng); break;
      default: len[r] = static_cast<int32_t>(std::min(200000.0, skew(rng))); break;
    }
  }
  return len;
}

CheckResult check_plan_random(DecodeSplit split) {
  CheckResult res;
  std::mt19937_64 rng(test_seed());
  int cases = 0;
  for (int kind = 0; kind < 3; ++kind) {
    for (int rows : {1, 3, 8, 64, 512}) {
      for (int32_t slots : {1, 7, 528, 2112}) {
        for (int32_t item_cost : {0, 2, 6}) {
          DecodePlanOptions opt;
          opt.split = split;
          opt.item_cost_pages = item_cost;
          const std::vector<int32_t> len = random_lengths(rng, rows, kind);
          auto plan = adakv::cuda::decode_attention_plan(len, slots, opt);
          if (!plan) return {false, "plan failed: " + plan.status().message(), ""};
          const std::string problem = plan_problem(*plan, len, opt, slots);
          ++cases;
          if (!problem.empty()) {
            std::ostringstream m;
            m << problem << " (kind " << kind << ", rows " << rows << ", slots " << slots << ", item cost "
              << item_cost << ", seed " << test_seed() << ")";
            return {false, m.str(), ""};
          }
        }
      }
    }
  }
  res.info = std::to_string(cases) + " random plans consistent";
  return res;
}

CheckResult check_plan_edges() {
  DecodePlanOptions opt;
  opt.split = DecodeSplit::kBalanced;
  opt.item_cost_pages = 2;
  // Hand-checked: 3 rows of 1, 0 and 40 pages over 2 warps with item cost 2: total cost
  // 41 + 2 * (2 + 1) = 47, targets 23 and 47. Warp 0 takes row 0 (1 page, cum 3) and 18 pages of
  // row 2 (cum 23); warp 1 the remaining 22.
  const std::vector<int32_t> len = {16, 0, 40 * 16};
  auto plan = adakv::cuda::decode_attention_plan(len, 2, opt);
  if (!plan) return {false, plan.status().message(), ""};
  const auto& it = plan->items;
  if (it.size() != 3 || it[0].row != 0 || it[0].page_end != 1 || it[0].partial != -1 || it[1].row != 2 ||
      it[1].page_begin != 0 || it[1].page_end != 18 || it[1].partial != 0 || it[2].row != 2 || it[2].page_begin != 18 ||
      it[2].page_end != 40 || it[2].partial != 1 || plan->warp_item_offsets != std::vector<int32_t>{0, 2, 3} ||
      plan->row_merge[1].partial_count != 0 || plan->row_merge[2].partial_count != 2)
    return {false, "hand-checked 3-row plan differs", ""};
  // All rows empty: no items, every row marked empty.
  auto empty = adakv::cuda::decode_attention_plan(std::vector<int32_t>{0, 0, 0}, 4, opt);
  if (!empty || !empty->items.empty() || empty->row_merge[2].partial_count != 0)
    return {false, "empty rows produce work", ""};
  // Negative length and no warps are rejected.
  if (adakv::cuda::decode_attention_plan(std::vector<int32_t>{3, -1}, 4, opt))
    return {false, "negative length accepted", ""};
  if (adakv::cuda::decode_attention_plan(std::vector<int32_t>{3}, 0, opt)) return {false, "zero slots accepted", ""};
  // Row-aligned, hand-checked: 8 rows of 256 pages and 2 short rows (1 and 3 pages) over 264
  // slots, at least 8 pages per slot (257 workers), item cost 2: a share of ceil(2052 / 257) = 8
  // pages needs 8 * 32 + 2 = 258 slots (one for each short row: a long row between them closes
  // the first's), 9 fits (8 * ceil(256 / 9) + 2 = 234), so every long row is cut into 29 pieces
  // of 8-9 pages, each in a slot of its own.
  DecodePlanOptions al;
  al.split = DecodeSplit::kRowAligned;
  al.min_pages_per_warp = 8;
  al.item_cost_pages = 2;
  std::vector<int32_t> al_len(8, 256 * 16);
  al_len.insert(al_len.begin() + 3, 16);
  al_len.push_back(3 * 16 - 5);
  auto ap = adakv::cuda::decode_attention_plan(al_len, 264, al);
  if (!ap) return {false, "row-aligned plan failed: " + ap.status().message(), ""};
  if (ap->items.size() != 8 * 29 + 2) return {false, "row-aligned: " + std::to_string(ap->items.size()) + " items", ""};
  for (int32_t r = 0; r < 10; ++r) {
    const bool short_row = r == 3 || r == 9;
    if (ap->row_merge[r].partial_count != (short_row ? -1 : 29))
      return {false, "row-aligned: row " + std::to_string(r) + " has " + std::to_string(ap->row_merge[r].partial_count) +
                         " pieces", ""};
  }
  for (int32_t w = 0; w < ap->num_warps; ++w) {
    const int32_t n = ap->warp_item_offsets[w + 1] - ap->warp_item_offsets[w];
    for (int32_t i = ap->warp_item_offsets[w]; i < ap->warp_item_offsets[w + 1]; ++i) {
      const auto& it = ap->items[i];
      if (it.partial >= 0 && (n != 1 || it.page_end - it.page_begin < 8 || it.page_end - it.page_begin > 9))
        return {false, "row-aligned: slot " + std::to_string(w) + " holds a piece of " +
                           std::to_string(it.page_end - it.page_begin) + " pages beside " + std::to_string(n - 1) +
                           " other items", ""};
    }
  }
  if (const std::string problem = plan_problem(*ap, al_len, al, 264); !problem.empty())
    return {false, "row-aligned: " + problem, ""};
  // Whole rows, hand-checked: 256 rows of 256 pages over 264 slots (batch 32 of 8 kv heads at 4K),
  // item cost 2. The balanced split's targets are 66574 / 264 = 252.2 apart (65536 pages + 2 x
  // (256 + 263) item costs), so most slots hold the ends of two rows: a busiest slot of 249-250
  // pages + 3 item costs; a row in a slot of its own costs 258, within the merge's 8: every row
  // whole, no partials. With merge_cost_pages 0 the split stays; with one row of 2048 pages
  // (Ada-like skew) whole rows would cost 2050 and the split stays too.
  DecodePlanOptions wh;
  wh.item_cost_pages = 2;
  std::vector<int32_t> wh_len(256, 256 * 16);
  auto whole = adakv::cuda::decode_attention_plan(wh_len, 264, wh);
  if (!whole) return {false, "whole-row plan failed: " + whole.status().message(), ""};
  if (whole->items.size() != 256 || whole->num_partials != 0)
    return {false, "whole rows: " + std::to_string(whole->items.size()) + " items, " +
                       std::to_string(whole->num_partials) + " partials (want 256, 0)", ""};
  if (const std::string problem = plan_problem(*whole, wh_len, wh, 264); !problem.empty())
    return {false, "whole rows: " + problem, ""};
  DecodePlanOptions no_merge_cost = wh;
  no_merge_cost.merge_cost_pages = 0;
  auto split = adakv::cuda::decode_attention_plan(wh_len, 264, no_merge_cost);
  if (!split || split->num_partials == 0) return {false, "merge_cost_pages 0: rows kept whole", ""};
  // With item cost 6 (the default) the split's busiest slot (249 pages in 2 items) costs 249 + 3 x 6
  // = 267 against 256 + 6 = 262 for a row of its own: whole rows win even without the merge's cost.
  DecodePlanOptions cost6;
  cost6.item_cost_pages = 6;
  cost6.merge_cost_pages = 0;
  auto whole6 = adakv::cuda::decode_attention_plan(wh_len, 264, cost6);
  if (!whole6 || whole6->num_partials != 0) return {false, "item cost 6, merge cost 0: rows not kept whole", ""};
  wh_len[100] = 2048 * 16;
  auto skew = adakv::cuda::decode_attention_plan(wh_len, 264, wh);
  if (!skew || skew->num_partials == 0) return {false, "skewed rows kept whole", ""};
  if (const std::string problem = plan_problem(*skew, wh_len, wh, 264); !problem.empty())
    return {false, "skewed rows: " + problem, ""};
  return {};
}

// The options the runner plans with: the item and merge costs are times counted in pages of a
// d 128 step at 8 warps per SM, so they double where a slot reads its pages twice as fast (d 64 at
// 8 warps per SM) and stay where the slots double too (d 64 at 16); block items double a warp's
// minimum share.
CheckResult check_plan_costs_by_head_dim() {
  adakv::cuda::DecodeAttentionOptions o;
  o.plan.item_cost_pages = 6;
  o.plan.merge_cost_pages = 8;
  o.plan.min_pages_per_warp = 4;
  struct Want {
    int head_dim, warps_per_sm;
    bool block_items;
    int item, merge, min_pages;
  };
  for (const Want w : {Want{128, 8, true, 6, 8, 8}, Want{64, 8, true, 12, 16, 8}, Want{64, 16, true, 6, 8, 8},
                       Want{128, 12, true, 6, 8, 8}, Want{64, 8, false, 12, 16, 4}, Want{128, 4, false, 12, 16, 4}}) {
    o.head_dim = w.head_dim;
    o.block_items = w.block_items;
    const DecodePlanOptions p = adakv::cuda::effective_plan_options(o, w.warps_per_sm);
    if (p.item_cost_pages != w.item || p.merge_cost_pages != w.merge || p.min_pages_per_warp != w.min_pages ||
        p.align_min_slots_per_row != o.plan.align_min_slots_per_row || p.split != o.plan.split)
      return {false,
              "head_dim " + std::to_string(w.head_dim) + ", " + std::to_string(w.warps_per_sm) + " warps per SM" +
                  (w.block_items ? ", block items" : ", warp items") + ": item / merge / min pages " +
                  std::to_string(p.item_cost_pages) + " / " + std::to_string(p.merge_cost_pages) + " / " +
                  std::to_string(p.min_pages_per_warp) + ", want " + std::to_string(w.item) + " / " +
                  std::to_string(w.merge) + " / " + std::to_string(w.min_pages),
              ""};
  }
  return {};
}

// kAuto's choice (auto_merge) on hand-made plans: the pieces of the longest split row against
// fused_max_partials (16), or fused_max_partials_crowded (40) where the merge kernel's grid (rows x
// group size) exceeds the SMs.
CheckResult check_auto_merge() {
  using adakv::cuda::DecodeMerge;
  adakv::cuda::DecodeAttentionOptions o;
  o.merge = DecodeMerge::kAuto;
  struct Want {
    int rows, most, qo_heads, kv_heads, sms;
    DecodeMerge merge;
  };
  const DecodeMerge fused = DecodeMerge::kFused, kernel = DecodeMerge::kKernel;
  for (const Want w : {Want{8, 33, 32, 8, 132, kernel},    // batch 1: 32 merge blocks fit, 33 > 16
                       Want{8, 16, 32, 8, 132, fused},     // at the limit
                       Want{64, 34, 32, 8, 132, fused},    // batch 8 Ada: 256 merge blocks, 34 <= 40
                       Want{64, 34, 32, 8, 300, kernel},   // ... on a device where they all fit
                       Want{64, 41, 32, 8, 132, kernel},   // past the crowded limit
                       Want{33, 20, 32, 8, 132, kernel},   // 132 merge blocks: not crowded
                       Want{34, 20, 32, 8, 132, fused},    // 136: crowded
                       Want{17, 20, 64, 8, 132, fused}}) { // group 8: 136 merge blocks
    adakv::cuda::DecodePlan plan;
    plan.num_rows = w.rows;
    plan.row_merge.assign(static_cast<size_t>(w.rows), adakv::cuda::DecodeRowMerge{0, 2});
    plan.row_merge[static_cast<size_t>(w.rows) / 2].partial_count = w.most;
    o.num_qo_heads = w.qo_heads;
    o.num_kv_heads = w.kv_heads;
    const DecodeMerge got = adakv::cuda::auto_merge(o, plan, w.sms);
    if (got != w.merge)
      return {false,
              std::to_string(w.rows) + " rows, longest " + std::to_string(w.most) + " pieces, group " +
                  std::to_string(w.qo_heads / w.kv_heads) + ", " + std::to_string(w.sms) + " SMs: " +
                  (got == fused ? "fused" : "kernel") + ", want " + (w.merge == fused ? "fused" : "kernel"),
              ""};
  }
  o.merge = DecodeMerge::kKernel;  // an explicit choice stands
  adakv::cuda::DecodePlan plan;
  plan.num_rows = 64;
  plan.row_merge.assign(64, adakv::cuda::DecodeRowMerge{0, 2});
  if (adakv::cuda::auto_merge(o, plan, 132) != DecodeMerge::kKernel) return {false, "kKernel was overridden", ""};
  return {};
}

// The no-arithmetic diagnostic (bench_decode_attention's ap2rn / bpa2rn) exists for d 128, bf16
// queries and block items only; create() names the option for anything else, before any device
// call.
CheckResult check_no_math_options() {
  struct Bad {
    int head_dim;
    adakv::DType q;
    bool block_items;
  };
  for (const Bad b : {Bad{64, adakv::DType::kBF16, true}, Bad{128, adakv::DType::kF32, true},
                      Bad{128, adakv::DType::kBF16, false}}) {
    DecodeAttentionOptions o;
    o.num_qo_heads = 32;
    o.num_kv_heads = 8;
    o.head_dim = b.head_dim;
    o.q_dtype = b.q;
    o.block_items = b.block_items;
    o.max_rows = 8;
    o.diagnostic_no_math = true;
    auto a = DecodeAttention::create(o);
    const std::string what = "d " + std::to_string(b.head_dim) + (b.q == adakv::DType::kF32 ? ", fp32 q" : "") +
                             (b.block_items ? "" : ", warp items");
    if (a) return {false, what + ": the diagnostic was accepted", ""};
    if (a.status().message().find("diagnostic_no_math") == std::string::npos)
      return {false, what + ": the error does not name the option: " + a.status().message(), ""};
  }
  return {};
}

// --- GPU checks ----------------------------------------------------------------------------------

struct GpuCase {
  int num_kv_heads = 8;
  int group = 4;
  int head_dim = 128;
  bool q_f32 = false;
  int pages_per_iter = 2;
  DecodeSplit split = DecodePlanOptions{}.split;  // the library's default (row-aligned)
  int max_warps_per_sm = 0;  // small: few warps, long pieces; 0: every resident warp, many partials
  int min_pages_per_warp = 4;
  float q_sigma = 1.f;  // 3: peaky softmax
  bool dependent_launch = true;
  bool default_stream = false;  // the legacy default stream instead of a created one
  adakv::cuda::DecodeMerge merge = adakv::cuda::DecodeMerge::kAuto;
  bool block_items = true;        // v3 block-item kernel (default) or the v2 warp kernel
  bool host_offsets = false;      // plan() gets the host row_page_offsets (absolute item offsets)
  bool overlap_prologue = false;  // the attention kernel as a programmatic dependent
  int prefetch_pages = 0;         // with overlap_prologue: pages per warp requested in L2 first
  int merge_warps = 0;            // merge kernel block width (0: from the plan's longest row)
  int merge_slices = 0;           // merge kernel slices per (row, head) (0: from the plan)
  // Each checked run() is preceded, on the same stream and without a sync, by a run() of the same
  // plan on another query into another output: the two launches' kernels may overlap.
  bool back_to_back = false;
  std::vector<int32_t> lengths;  // [rows], rows a multiple of num_kv_heads
};

constexpr uint16_t kBf16NaN = 0x7fc0;

#define CUDA_OK(expr)                                                                               \
  do {                                                                                              \
    const cudaError_t e_ = (expr);                                                                  \
    if (e_ != cudaSuccess) return std::string(#expr) + ": " + cudaGetErrorString(e_);               \
  } while (0)

// The test's page table: each row's pages, and 2 reserved pages past the last one of every third
// row (so the table is not the dense CSR of the lengths). [rows + 1] offsets.
std::vector<int32_t> table_offsets(const std::vector<int32_t>& lengths) {
  std::vector<int32_t> offsets(lengths.size() + 1, 0);
  for (size_t r = 0; r < lengths.size(); ++r)
    offsets[r + 1] = offsets[r] + pages_of(lengths[r]) + (r % 3 == 1 ? 2 : 0);
  return offsets;
}

// One step: fresh random pool, page table, q; plan, run, compare. Returns "" or the failure.
// after_plan (optional) runs on the step's stream after each plan() and before the run() (shared
// plan buffers: other layers' plans and the upload).
std::string run_step(DecodeAttention& attn, const GpuCase& cs, const std::vector<int32_t>& lengths,
                     std::mt19937_64& rng, double* max_rel, double* max_lse_err,
                     const std::function<std::string(cudaStream_t)>& after_plan = {}) {
  const int hkv = cs.num_kv_heads, g = cs.group, d = cs.head_dim, H = hkv * g;
  const int rows = static_cast<int>(lengths.size());
  const int seqs = rows / hkv;
  // Page table: every row's pages drawn from a shuffled pool with spare pages; every third row
  // has 2 reserved pages past its last one (NaN-filled), so the table is not the dense CSR of the
  // lengths and a kernel that used the wrong row offset would read NaN.
  const std::vector<int32_t> offsets = table_offsets(lengths);
  const int32_t used_pages = offsets[rows];
  const int32_t pool_pages = used_pages + 37;
  std::vector<int32_t> perm(pool_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> page_ids(perm.begin(), perm.begin() + used_pages);

  // K/V pool: N(0, 1) in bf16; NaN in every slot no row holds (unused pages, tails of last pages).
  const size_t page_elems = size_t{kPageSize} * d;
  std::vector<uint16_t> hk(size_t(pool_pages) * page_elems, kBf16NaN), hv(hk.size(), kBf16NaN);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int r = 0; r < rows; ++r)
    for (int e = 0; e < lengths[r]; ++e) {
      const size_t base = size_t(page_ids[offsets[r] + e / kPageSize]) * page_elems + size_t(e % kPageSize) * d;
      for (int i = 0; i < d; ++i) {
        hk[base + i] = f32_to_bf16(normal(rng));
        hv[base + i] = f32_to_bf16(normal(rng));
      }
    }
  // q inside a wider per-sequence row (as in a fused QKV buffer): stride H*d + 2*hkv*d.
  const int64_t q_stride = int64_t{H} * d + 2 * int64_t{hkv} * d;
  std::vector<float> qf(size_t(seqs) * q_stride);  // uploaded as the fp32 query
  for (auto& x : qf) x = normal(rng) * cs.q_sigma;
  std::vector<uint16_t> qb(qf.size());
  // The kernel's contract rounds an fp32 query to bf16 for the tensor cores (FlashInfer does the
  // same); the reference uses the rounded values, so this checks the fp32 load and rounding path.
  std::vector<float> qref(qf.size());
  for (size_t i = 0; i < qf.size(); ++i) {
    qb[i] = f32_to_bf16(qf[i]);
    qref[i] = bf16_to_f32(qb[i]);
  }
  // Output with 8 padding elements per sequence that must stay untouched.
  const int64_t out_stride = int64_t{H} * d + 8;

  DeviceArray<uint16_t> dk(hk.size()), dv(hv.size());
  DeviceArray<int32_t> doff(offsets.size()), dids(page_ids.size()), dlen(lengths.size());
  DeviceArray<float> dqf(qf.size());
  DeviceArray<uint16_t> dqb(qb.size()), dout(size_t(seqs) * out_stride);
  DeviceArray<float> dlse(size_t(seqs) * H);
  if (!dk.ptr || !dv.ptr || !doff.ptr || !dids.ptr || !dlen.ptr || !dqf.ptr || !dqb.ptr || !dout.ptr || !dlse.ptr)
    return "cudaMalloc failed";
  if (!dk.upload(hk) || !dv.upload(hv) || !doff.upload(offsets) || !dids.upload(page_ids) || !dlen.upload(lengths) ||
      !dqf.upload(qf) || !dqb.upload(qb))
    return "upload failed";
  // Synchronous copies from pageable memory may still be in flight when they return, and the
  // created stream below does not wait for the legacy stream.
  CUDA_OK(cudaDeviceSynchronize());

  PagedKvView view;
  view.k_pool = reinterpret_cast<const __nv_bfloat16*>(dk.ptr);
  view.v_pool = reinterpret_cast<const __nv_bfloat16*>(dv.ptr);
  view.row_page_offsets = doff.ptr;
  view.page_ids = dids.ptr;
  view.row_lengths = dlen.ptr;
  view.num_rows = rows;
  view.num_kv_heads = hkv;
  view.head_dim = d;
  view.page_stride = int64_t(page_elems);

  cudaStream_t stream = nullptr;
  if (!cs.default_stream) CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() {
      if (s != nullptr) cudaStreamDestroy(s);
    }
  } guard{stream};
  const float scale = 1.f / std::sqrt(float(d));
  const void* q = cs.q_f32 ? static_cast<const void*>(dqf.ptr) : static_cast<const void*>(dqb.ptr);
  std::vector<uint16_t> out1, out2;
  std::vector<float> lse1;
  DeviceArray<uint16_t> decoy_q(cs.back_to_back ? qb.size() : 0), decoy_out(cs.back_to_back ? dout.n : 0);
  DeviceArray<float> decoy_qf(cs.back_to_back ? qf.size() : 0);
  if (cs.back_to_back) {
    std::vector<uint16_t> other(qb.size());
    std::vector<float> otherf(qf.size());
    for (size_t i = 0; i < other.size(); ++i) other[i] = f32_to_bf16(otherf[i] = normal(rng) * cs.q_sigma);
    if (!decoy_q.ptr || !decoy_out.ptr || !decoy_qf.ptr || !decoy_q.upload(other) || !decoy_qf.upload(otherf))
      return "decoy buffers failed";
    CUDA_OK(cudaDeviceSynchronize());
  }
  for (int run = 0; run < 2; ++run) {  // twice: the result must be bitwise the same (no races)
    CUDA_OK(cudaMemsetAsync(dout.ptr, 0xff, dout.n * sizeof(uint16_t), stream));  // bf16 NaN everywhere
    CUDA_OK(cudaMemsetAsync(dlse.ptr, 0xff, dlse.n * sizeof(float), stream));     // fp32 NaN
    const adakv::Status st =
        cs.host_offsets ? attn.plan(lengths, offsets, stream) : attn.plan(lengths, stream);
    if (!st) return "plan: " + st.message();
    if (after_plan) {
      const std::string e = after_plan(stream);
      if (!e.empty()) return e;
    }
    if (cs.back_to_back) {
      const void* dq = cs.q_f32 ? static_cast<const void*>(decoy_qf.ptr) : static_cast<const void*>(decoy_q.ptr);
      const adakv::Status ds = attn.run(view, dq, q_stride, reinterpret_cast<__nv_bfloat16*>(decoy_out.ptr), out_stride,
                                        nullptr, scale, stream);
      if (!ds) return "run (decoy): " + ds.message();
    }
    const adakv::Status rs =
        attn.run(view, q, q_stride, reinterpret_cast<__nv_bfloat16*>(dout.ptr), out_stride, dlse.ptr, scale, stream);
    if (!rs) return "run: " + rs.message();
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaGetLastError());
    if (!dout.download(run == 0 ? &out1 : &out2)) return "download failed";
    if (run == 0 && !dlse.download(&lse1)) return "download failed";
  }
  if (out1 != out2) return "two runs on the same inputs differ (a race?)";

  std::ostringstream err;
  std::vector<double> s, ref(d);
  for (int seq = 0; seq < seqs; ++seq) {
    for (int i = H * d; i < out_stride; ++i)
      if (out1[size_t(seq) * out_stride + i] != 0xffff) return "padding after a sequence's output was written";
    for (int kvh = 0; kvh < hkv; ++kvh) {
      const int r = seq * hkv + kvh, len = lengths[r];
      for (int j = 0; j < g; ++j) {
        const int h = kvh * g + j;
        const uint16_t* o = &out1[size_t(seq) * out_stride + size_t(h) * d];
        const float lse = lse1[size_t(seq) * H + h];
        for (int i = 0; i < d; ++i) {
          if (!std::isfinite(bf16_to_f32(o[i]))) {
            err << "row " << r << " (length " << len << ") head " << h << " dim " << i << " not written or not finite";
            return err.str();
          }
        }
        if (len == 0) {
          for (int i = 0; i < d; ++i)
            if (o[i] != 0 && o[i] != 0x8000) return "empty row output not zero";
          if (!(std::isinf(lse) && lse < 0)) return "empty row lse not -inf";
          continue;
        }
        // Reference in fp64 from the same bf16 K/V (and the q values the case defines).
        const float* qh = &qref[size_t(seq) * q_stride + size_t(h) * d];
        s.assign(len, 0.0);
        double mx = -INFINITY;
        for (int e = 0; e < len; ++e) {
          const size_t base = size_t(page_ids[offsets[r] + e / kPageSize]) * page_elems + size_t(e % kPageSize) * d;
          double acc = 0;
          for (int i = 0; i < d; ++i) acc += double(qh[i]) * bf16_to_f32(hk[base + i]);
          s[e] = acc * scale;
          mx = std::max(mx, s[e]);
        }
        double z = 0;
        std::fill(ref.begin(), ref.end(), 0.0);
        for (int e = 0; e < len; ++e) {
          const double w = std::exp(s[e] - mx);
          z += w;
          const size_t base = size_t(page_ids[offsets[r] + e / kPageSize]) * page_elems + size_t(e % kPageSize) * d;
          for (int i = 0; i < d; ++i) ref[i] += w * bf16_to_f32(hv[base + i]);
        }
        double num = 0, den = 0;
        for (int i = 0; i < d; ++i) {
          ref[i] /= z;
          const double diff = bf16_to_f32(o[i]) - ref[i];
          num += diff * diff;
          den += ref[i] * ref[i];
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        const double lse_err = std::abs(double(lse) - (mx + std::log(z)));
        *max_rel = std::max(*max_rel, rel);
        *max_lse_err = std::max(*max_lse_err, lse_err);
        const double lse_tol = 1e-3;
        if (!(rel < 1e-2) || !(lse_err < lse_tol)) {
          err << "row " << r << " (length " << len << ") head " << h << ": relative error " << rel << ", lse error "
              << lse_err;
          return err.str();
        }
      }
    }
  }
  return "";
}

int most_partials(const DecodeAttention& attn) {
  int most = 0;
  for (const auto& m : attn.last_plan().row_merge) most = std::max(most, m.partial_count);
  return most;
}

const char* merge_name(adakv::cuda::DecodeMerge m) {
  using adakv::cuda::DecodeMerge;
  return m == DecodeMerge::kFused ? "fused" : "kernel";
}

CheckResult check_gpu(const GpuCase& cs) {
  CheckResult res;
  if (const std::string why = gpu_unavailable(); !why.empty()) return {true, why, ""};
  DecodeAttentionOptions opt;
  opt.num_qo_heads = cs.num_kv_heads * cs.group;
  opt.num_kv_heads = cs.num_kv_heads;
  opt.head_dim = cs.head_dim;
  opt.q_dtype = cs.q_f32 ? adakv::DType::kF32 : adakv::DType::kBF16;
  opt.max_rows = static_cast<int32_t>(cs.lengths.size());
  opt.pages_per_iter = cs.pages_per_iter;
  opt.max_warps_per_sm = cs.max_warps_per_sm;
  opt.dependent_launch = cs.dependent_launch;
  opt.plan.split = cs.split;
  opt.plan.min_pages_per_warp = cs.min_pages_per_warp;
  opt.merge = cs.merge;
  opt.block_items = cs.block_items;
  opt.overlap_prologue = cs.overlap_prologue;
  opt.prefetch_pages = cs.prefetch_pages;
  opt.merge_warps = cs.merge_warps;
  opt.merge_slices = cs.merge_slices;
  auto attn = DecodeAttention::create(opt);
  if (!attn) return {false, "create: " + attn.status().message(), ""};
  std::mt19937_64 rng(test_seed() ^ std::hash<std::string>{}(std::to_string(cs.head_dim) + std::to_string(cs.group)));
  double max_rel = 0, max_lse = 0;
  // Two decode steps on one workspace: the second appends an entry to every non-empty row.
  std::vector<int32_t> lengths = cs.lengths;
  for (int step = 0; step < 2; ++step) {
    const std::string failure = run_step(**attn, cs, lengths, rng, &max_rel, &max_lse);
    if (!failure.empty()) {
      return {false, "step " + std::to_string(step) + ": " + failure + " (seed " + std::to_string(test_seed()) + ")", ""};
    }
    for (auto& l : lengths) l += l > 0;
  }
  std::ostringstream info;
  info << "max relative error " << max_rel << ", max lse error " << max_lse << ", " << (*attn)->last_plan().items.size()
       << " work items, " << (*attn)->last_plan().num_partials << " partials (most in a row: " << most_partials(**attn)
       << "), merge " << merge_name((*attn)->last_merge());
  if ((*attn)->last_merge() == adakv::cuda::DecodeMerge::kKernel)
    info << " (" << (*attn)->last_merge_warps() << " warps x " << (*attn)->last_merge_slices() << " slices)";
  info << ", seed " << test_seed();
  res.info = info.str();
  return res;
}

// Lengths covering the page edge cases, one long row (skew) and random rows.
std::vector<int32_t> edge_lengths(int rows, int long_len, uint64_t salt) {
  const int32_t fixed[] = {0, 1, 15, 16, 17, 31, 32, 33, 2, 100, 255, 256, 257, long_len, 1000, 4097};
  std::vector<int32_t> len(rows);
  std::mt19937_64 rng(test_seed() + salt);
  std::uniform_int_distribution<int> rnd(1, 3000);
  for (int r = 0; r < rows; ++r) len[r] = r < 16 ? fixed[r] : rnd(rng);
  std::shuffle(len.begin(), len.end(), rng);
  return len;
}

// Ada-like rows: lognormal around 900 entries (spread sigma), one heavy row of heavy_len; with
// short_every > 0 every short_every-th row (from the third) is short instead (r entries).
std::vector<int32_t> skewed_lengths(uint64_t salt, int rows, double sigma, int heavy_row, int32_t heavy_len,
                                    int short_every = 0) {
  std::mt19937_64 rng(test_seed() + salt);
  std::lognormal_distribution<double> ln(std::log(900.0), sigma);
  std::vector<int32_t> len;
  for (int r = 0; r < rows; ++r) {
    const int32_t x = std::max<int32_t>(1, int32_t(ln(rng)));
    len.push_back(short_every > 0 && r % short_every == 2 ? r : x);
  }
  len[heavy_row] = heavy_len;
  return len;
}

GpuCase make_case(int hkv, int g, int d, int seqs, int long_len) {
  GpuCase cs;
  cs.num_kv_heads = hkv;
  cs.group = g;
  cs.head_dim = d;
  cs.lengths = edge_lengths(hkv * seqs, long_len, uint64_t(hkv * 1000 + g * 10 + d));
  return cs;
}

// Rows of one to a few hundred partials for the merge kernel's shapes (balanced split, every
// resident warp, pieces of at least one page): shape 0 d 128 g 4 with the prologue overlapped and
// back to back, 1 d 64 g 1, 2 d 128 g 8; two long rows each.
GpuCase many_partials_case(int shape) {
  GpuCase cs = shape == 0   ? make_case(8, 4, 128, 1, 60000)
               : shape == 1 ? make_case(4, 1, 64, 2, 30000)
                            : make_case(2, 8, 128, 3, 40000);
  cs.lengths[1] = 70000;  // a second long row
  cs.split = DecodeSplit::kBalanced;
  cs.min_pages_per_warp = 1;
  cs.merge = adakv::cuda::DecodeMerge::kKernel;
  cs.host_offsets = shape != 1;
  cs.overlap_prologue = shape == 0;
  cs.prefetch_pages = shape == 0 ? 2 : 0;
  cs.back_to_back = shape != 2;
  return cs;
}

// DecodeAttentionLayers: `layers` layers with different row lengths share one plan buffer. Each
// layer in turn is planned, then every other layer is planned (staged) and one upload sends all
// that changed; the layer then runs and is checked. A layer whose plan is unchanged keeps the
// copy uploaded in an earlier turn (clean slots between dirty ones are copied again unchanged).
// Two steps: the second grows every row by one entry, so some rows cross pages and re-plan.
CheckResult check_gpu_layers(const GpuCase& cs, int layers, int long_len) {
  if (const std::string why = gpu_unavailable(); !why.empty()) return {true, why, ""};
  DecodeAttentionOptions opt;
  opt.num_qo_heads = cs.num_kv_heads * cs.group;
  opt.num_kv_heads = cs.num_kv_heads;
  opt.head_dim = cs.head_dim;
  opt.max_rows = static_cast<int32_t>(cs.lengths.size());
  opt.merge = cs.merge;
  opt.overlap_prologue = cs.overlap_prologue;
  opt.prefetch_pages = cs.prefetch_pages;
  auto set = adakv::cuda::DecodeAttentionLayers::create(opt, layers);
  if (!set) return {false, "create: " + set.status().message(), ""};
  std::vector<std::vector<int32_t>> per(static_cast<size_t>(layers));
  for (int l = 0; l < layers; ++l)
    per[static_cast<size_t>(l)] = edge_lengths(static_cast<int>(cs.lengths.size()), long_len / (l + 1), 500 + l);
  std::mt19937_64 rng(test_seed() ^ 0x5eedull);
  double max_rel = 0, max_lse = 0;
  for (int step = 0; step < 2; ++step) {
    for (int l = 0; l < layers; ++l) {
      const auto others = [&](cudaStream_t stream) -> std::string {
        for (int o = 0; o < layers; ++o) {
          if (o == l) continue;
          const std::vector<int32_t>& len = per[static_cast<size_t>(o)];
          const adakv::Status st = cs.host_offsets ? (*set)->layer(o).plan(len, table_offsets(len), stream)
                                                   : (*set)->layer(o).plan(len, stream);
          if (!st) return "plan of layer " + std::to_string(o) + ": " + st.message();
        }
        const adakv::Status up = (*set)->upload(stream);
        return up ? "" : "upload: " + up.message();
      };
      const std::string failure =
          run_step((*set)->layer(l), cs, per[static_cast<size_t>(l)], rng, &max_rel, &max_lse, others);
      if (!failure.empty())
        return {false, "step " + std::to_string(step) + ", layer " + std::to_string(l) + ": " + failure +
                           " (seed " + std::to_string(test_seed()) + ")", ""};
    }
    for (auto& len : per)
      for (auto& x : len) x += x > 0;
  }
  std::ostringstream info;
  info << layers << " layers, max relative error " << max_rel << ", max lse error " << max_lse << ", seed "
       << test_seed();
  return {false, "", info.str()};
}

std::vector<NamedCheck> all_checks() {
  std::vector<NamedCheck> v;
  v.push_back({"PlanBalancedRandom", [] { return check_plan_random(DecodeSplit::kBalanced); }});
  v.push_back({"PlanOneBlockPerRowRandom", [] { return check_plan_random(DecodeSplit::kOneBlockPerRow); }});
  v.push_back({"PlanRowAlignedRandom", [] { return check_plan_random(DecodeSplit::kRowAligned); }});
  v.push_back({"PlanEdges", [] { return check_plan_edges(); }});
  v.push_back({"PlanCostsByHeadDim", [] { return check_plan_costs_by_head_dim(); }});
  v.push_back({"AutoMerge", [] { return check_auto_merge(); }});
  v.push_back({"NoMathDiagnosticOptions", [] { return check_no_math_options(); }});
  // Plans of several layers in one buffer, uploaded together (the engine's decode attention): the
  // legacy stream keeps every plan() on one stream, so unchanged plans are reused across turns.
  v.push_back({"GpuLayersSharedPlansHostOffsets", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 20000);
                 cs.default_stream = true;
                 cs.host_offsets = true;
                 cs.merge = adakv::cuda::DecodeMerge::kKernel;
                 cs.overlap_prologue = true;
                 cs.prefetch_pages = 2;
                 return check_gpu_layers(cs, 4, 20000);
               }});
  v.push_back({"GpuLayersSharedPlansD64Fused", [] {
                 GpuCase cs = make_case(8, 4, 64, 2, 9000);
                 cs.default_stream = true;
                 cs.merge = adakv::cuda::DecodeMerge::kFused;
                 return check_gpu_layers(cs, 3, 9000);
               }});
  // Llama-3-8B-like: Hkv 8, g 4, d 128; 3 sequences with one 20000-entry row.
  v.push_back({"GpuD128G4Pages2", [] { return check_gpu(make_case(8, 4, 128, 3, 20000)); }});
  v.push_back({"GpuD128G4Pages1", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 20000);
                 cs.pages_per_iter = 1;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G4PeakyFp32Query", [] {
                 GpuCase cs = make_case(8, 4, 128, 2, 9000);
                 cs.q_f32 = true;
                 cs.q_sigma = 3.f;
                 return check_gpu(cs);
               }});
  // Few warps: long pieces crossing many 32-page id batches; odd page counts per warp.
  v.push_back({"GpuD128G4FewWarps", [] {
                 GpuCase cs = make_case(8, 4, 128, 2, 100000);
                 cs.max_warps_per_sm = 1;
                 cs.min_pages_per_warp = 1;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G4OneBlockPerRow", [] {
                 GpuCase cs = make_case(8, 4, 128, 2, 5000);
                 cs.split = DecodeSplit::kOneBlockPerRow;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G4NoDependentLaunch", [] {
                 GpuCase cs = make_case(8, 4, 128, 2, 12000);
                 cs.dependent_launch = false;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G8DefaultStream", [] {
                 GpuCase cs = make_case(4, 8, 128, 4, 6000);
                 cs.default_stream = true;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G1", [] { return check_gpu(make_case(16, 1, 128, 1, 6000)); }});
  v.push_back({"GpuD64G4Pages4", [] {
                 GpuCase cs = make_case(8, 4, 64, 3, 20000);
                 cs.pages_per_iter = 4;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD64G2Pages2", [] { return check_gpu(make_case(8, 2, 64, 2, 15000)); }});
  v.push_back({"GpuD64G7Pages1", [] {
                 GpuCase cs = make_case(2, 7, 64, 9, 7000);
                 cs.pages_per_iter = 1;
                 cs.q_sigma = 3.f;
                 return check_gpu(cs);
               }});
  // Fused merge (the last-arriving warp of a row merges; per-row counters reset for the next
  // launch: each case runs 2 steps x 2 launches on one workspace). Many partials per row (every
  // resident warp), few (one warp per SM), g 8, g 1 at d 64 (fewer float4 slots than lanes).
  using adakv::cuda::DecodeMerge;
  v.push_back({"GpuD128G4FusedManyPartials", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 20000);
                 cs.merge = DecodeMerge::kFused;
                 cs.min_pages_per_warp = 1;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G4FusedFewWarpsFp32Query", [] {
                 GpuCase cs = make_case(8, 4, 128, 2, 30000);
                 cs.merge = DecodeMerge::kFused;
                 cs.max_warps_per_sm = 1;
                 cs.pages_per_iter = 1;
                 cs.q_f32 = true;
                 cs.q_sigma = 3.f;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G8FusedDefaultStream", [] {
                 GpuCase cs = make_case(4, 8, 128, 4, 6000);
                 cs.merge = DecodeMerge::kFused;
                 cs.default_stream = true;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G4FusedOneBlockPerRow", [] {
                 GpuCase cs = make_case(8, 4, 128, 2, 5000);
                 cs.merge = DecodeMerge::kFused;
                 cs.split = DecodeSplit::kOneBlockPerRow;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD128G4KernelMerge", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 20000);
                 cs.merge = DecodeMerge::kKernel;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD64G4FusedPages4", [] {
                 GpuCase cs = make_case(8, 4, 64, 3, 20000);
                 cs.merge = DecodeMerge::kFused;
                 cs.pages_per_iter = 4;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD64G1FusedPages2", [] {
                 GpuCase cs = make_case(16, 1, 64, 2, 9000);
                 cs.merge = DecodeMerge::kFused;
                 cs.min_pages_per_warp = 1;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuD64G7AutoMerge", [] {
                 GpuCase cs = make_case(2, 7, 64, 9, 7000);
                 cs.merge = DecodeMerge::kAuto;  // picks by partials per row and merge blocks (on 126+ SMs: the kernel)
                 cs.max_warps_per_sm = 2;
                 cs.q_sigma = 3.f;
                 return check_gpu(cs);
               }});
  // v2 warp kernel (block_items off): the cases above run the v3 block-item kernel (the default).
  v.push_back({"GpuWarpD128G4Pages2", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 20000);
                 cs.block_items = false;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuWarpD128G4FusedPages1", [] {
                 GpuCase cs = make_case(8, 4, 128, 2, 30000);
                 cs.block_items = false;
                 cs.merge = DecodeMerge::kFused;
                 cs.pages_per_iter = 1;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuWarpD64G4Pages4Kernel", [] {
                 GpuCase cs = make_case(8, 4, 64, 3, 20000);
                 cs.block_items = false;
                 cs.pages_per_iter = 4;
                 cs.merge = DecodeMerge::kKernel;
                 return check_gpu(cs);
               }});
  // v3 block items: absolute page-table offsets from the host, the prologue overlapped (PDL),
  // odd lengths, empty and single-page rows, Ada-like skew, fused and kernel merges.
  v.push_back({"GpuBlockD128G4HostOffsetsOverlap", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 20000);
                 cs.host_offsets = true;
                 cs.overlap_prologue = true;
                 cs.prefetch_pages = 4;
                 cs.merge = DecodeMerge::kKernel;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuBlockD128G4HostOffsetsFusedPages1", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 20000);
                 cs.host_offsets = true;
                 cs.overlap_prologue = true;
                 cs.merge = DecodeMerge::kFused;
                 cs.pages_per_iter = 1;
                 cs.min_pages_per_warp = 1;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuBlockD64G8HostOffsetsFusedPages4", [] {
                 GpuCase cs = make_case(4, 8, 64, 4, 12000);
                 cs.host_offsets = true;
                 cs.merge = DecodeMerge::kFused;
                 cs.pages_per_iter = 4;
                 cs.q_f32 = true;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuBlockOddEmptySinglePage", [] {
                 // Only short rows: empty, 1..16 entries (single page), odd lengths just past a
                 // page edge; blocks whose 4 warps mostly have no page.
                 GpuCase cs;
                 cs.split = DecodeSplit::kBalanced;
                 cs.num_kv_heads = 8;
                 cs.group = 4;
                 cs.head_dim = 128;
                 cs.host_offsets = true;
                 cs.min_pages_per_warp = 1;
                 const int32_t l[] = {0, 1, 3, 16, 17, 0, 5, 33, 15, 0, 49, 1, 7, 31, 65, 0};
                 for (int rep = 0; rep < 3; ++rep)
                   for (int32_t x : l) cs.lengths.push_back(x + (rep == 2 && x > 0 ? 2 * rep : 0));
                 cs.lengths.resize(cs.lengths.size() / 8 * 8);
                 return check_gpu(cs);
               }});
  v.push_back({"GpuBlockOddEmptySinglePageFused", [] {
                 GpuCase cs;
                 cs.num_kv_heads = 2;
                 cs.group = 1;
                 cs.head_dim = 64;
                 cs.merge = DecodeMerge::kFused;
                 cs.min_pages_per_warp = 1;
                 cs.lengths = {0, 1, 16, 17, 0, 0, 33, 3, 1, 0, 129, 15};
                 return check_gpu(cs);
               }});
  v.push_back({"GpuBlockAdaSkewKernelAndFused", [] {
                 // One row 8x the mean, the rest lognormal-like; batch 2 x 8 kv heads.
                 for (DecodeMerge mg : {DecodeMerge::kKernel, DecodeMerge::kFused}) {
                   GpuCase cs;
                   cs.host_offsets = true;
                   cs.overlap_prologue = mg == DecodeMerge::kKernel;
                   cs.prefetch_pages = mg == DecodeMerge::kKernel ? 32 : 0;
                   cs.merge = mg;
                   cs.lengths = skewed_lengths(77, 16, 0.6, 5, 8 * 1000 + 7);
                   const CheckResult res = check_gpu(cs);
                   if (!res.passed()) return res;
                 }
                 return CheckResult{};
               }});
  // The merge kernel under back-to-back launches of one workspace: each checked run() follows
  // another on a different query without a sync, so with the boundary overlapped the second
  // launch's attention kernel starts under the first one's merge and rewrites the partials it
  // reads (it may only do so past its griddepcontrol.wait). Rows of hundreds of partials, short
  // and empty rows, g 1 and d 64, g 8 with an fp32 query, no dependent launch, Ada-like skew.
  v.push_back({"GpuMergeD128G4ManyPartialsBackToBackOverlapBalanced", [] {
                 GpuCase cs = make_case(8, 4, 128, 3, 60000);
                 cs.split = DecodeSplit::kBalanced;
                 cs.merge = DecodeMerge::kKernel;
                 cs.min_pages_per_warp = 1;
                 cs.host_offsets = true;
                 cs.overlap_prologue = true;
                 cs.prefetch_pages = 8;
                 cs.back_to_back = true;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuMergeD128G8Fp32QueryBackToBack", [] {
                 GpuCase cs = make_case(4, 8, 128, 4, 6000);
                 cs.merge = DecodeMerge::kKernel;
                 cs.q_f32 = true;
                 cs.back_to_back = true;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuMergeOddEmptySinglePageG1D64Overlap", [] {
                 GpuCase cs;
                 cs.num_kv_heads = 2;
                 cs.group = 1;
                 cs.head_dim = 64;
                 cs.merge = DecodeMerge::kKernel;
                 cs.min_pages_per_warp = 1;
                 cs.pages_per_iter = 4;
                 cs.overlap_prologue = true;
                 cs.back_to_back = true;
                 cs.lengths = {0, 1, 16, 17, 0, 0, 33, 3, 1, 0, 129, 15, 5000, 0, 700, 2};
                 return check_gpu(cs);
               }});
  v.push_back({"GpuMergeD64G4NoDependentLaunch", [] {
                 GpuCase cs = make_case(8, 4, 64, 3, 20000);
                 cs.merge = DecodeMerge::kKernel;
                 cs.dependent_launch = false;
                 cs.back_to_back = true;
                 return check_gpu(cs);
               }});
  v.push_back({"GpuRowAlignedAdaSkewOverlap", [] {
                 // The row-aligned split on skewed rows with short ones among them.
                 GpuCase cs;
                 cs.split = DecodeSplit::kRowAligned;
                 cs.host_offsets = true;
                 cs.overlap_prologue = true;
                 cs.prefetch_pages = 8;
                 cs.back_to_back = true;
                 cs.merge = DecodeMerge::kKernel;
                 cs.lengths = skewed_lengths(79, 24, 0.9, 7, 8 * 1000 + 5, 5);
                 return check_gpu(cs);
               }});
  // The merge kernel's block widths: each of 4..32 warps on rows of 1 to a few hundred partials
  // (several batches of 8 per warp at 4 warps, fewer than one at 32), at d 128 g 4 (overlapped,
  // back to back), d 64 g 1 and d 128 g 8; and the width the plan picks.
  v.push_back({"MergeWidthFromPartials", [] {
                 using adakv::cuda::decode_detail::merge_warps_for;
                 const std::pair<int, int> want[] = {{0, 4},   {2, 4},    {33, 4},   {64, 4},
                                                     {65, 16}, {128, 16}, {256, 16}, {1000, 16}};
                 for (const auto& [most, w] : want)
                   if (merge_warps_for(most) != w)
                     return CheckResult{false, std::to_string(most) + " partials: " + std::to_string(merge_warps_for(most)) +
                                                   " warps, want " + std::to_string(w), ""};
                 return CheckResult{};
               }});
  // The merge kernel's shape from the plan: 4 slices of 4-warp blocks for rows of more than 72
  // partials where every (row, head, slice) block fits one per SM, else merge_warps_for's width.
  v.push_back({"MergeShapeFromPartials", [] {
                 using adakv::cuda::decode_detail::merge_shape_for;
                 struct Want {
                   int most;
                   int64_t heads;
                   int warps, slices;
                 };
                 const Want want[] = {{33, 32, 4, 1},   {36, 32, 4, 1},    {66, 32, 16, 1},  {72, 32, 16, 1},
                                      {73, 32, 4, 4},   {260, 32, 4, 4},   {130, 33, 4, 4},  {130, 34, 16, 1},
                                      {60, 67, 4, 1},   {130, 256, 16, 1}, {0, 8, 4, 1}};
                 for (const Want& x : want) {
                   const auto got = merge_shape_for(x.most, x.heads, 132);
                   if (got.warps != x.warps || got.slices != x.slices)
                     return CheckResult{false, std::to_string(x.most) + " partials, " + std::to_string(x.heads) +
                                                   " heads on 132 SMs: " + std::to_string(got.warps) + " warps x " +
                                                   std::to_string(got.slices) + " slices, want " +
                                                   std::to_string(x.warps) + " x " + std::to_string(x.slices), ""};
                 }
                 return CheckResult{};
               }});
  // The sliced merge against the CPU: 4 slices of 4-warp blocks on rows of one to a few
  // hundred partials (fewer than one batch per group to several), at d 128 g 4 (overlapped, back
  // to back), d 64 g 1 and d 128 g 8, with an empty row among them; and the shape the plan picks.
  v.push_back({"GpuMergeSlicesManyPartials", [] {
                 std::string info;
                 for (int shape = 0; shape < 3; ++shape) {
                   GpuCase cs = many_partials_case(shape);
                   cs.lengths[2] = 0;  // an empty row: zeros in every slice
                   cs.merge_slices = 4;
                   const CheckResult res = check_gpu(cs);
                   if (!res.passed()) return res;
                   if (shape == 0) info += "4 slices: " + res.info + "; ";
                 }
                 // Batch 1 with one long row (Ada-KV's skew): the plan picks 4 slices on an H100/H200.
                 GpuCase cs = make_case(8, 4, 128, 1, 4000);
                 cs.lengths[3] = 64000;
                 cs.merge = DecodeMerge::kKernel;
                 const CheckResult res = check_gpu(cs);
                 if (!res.passed()) return res;
                 return CheckResult{false, "", info + "auto: " + res.info};
               }});
  v.push_back({"GpuMergeWidthsManyPartials", [] {
                 std::string info;
                 for (int w : {4, 8, 16, 32}) {
                   for (int shape = 0; shape < 3; ++shape) {
                     GpuCase cs = many_partials_case(shape);
                     cs.merge_warps = w;
                     const CheckResult res = check_gpu(cs);
                     if (!res.passed()) return res;
                     if (shape == 0) info += std::to_string(w) + " warps: " + res.info + "; ";
                   }
                 }
                 GpuCase cs = make_case(8, 4, 128, 1, 60000);  // the width from the plan
                 cs.merge = DecodeMerge::kKernel;
                 const CheckResult res = check_gpu(cs);
                 if (!res.passed()) return res;
                 return CheckResult{false, "", info + "auto: " + res.info};
               }});
  v.push_back({"GpuMergeAdaSkewOverlapBackToBackBalanced", [] {
                 GpuCase cs;
                 cs.split = DecodeSplit::kBalanced;
                 cs.host_offsets = true;
                 cs.overlap_prologue = true;
                 cs.prefetch_pages = 8;
                 cs.back_to_back = true;
                 cs.merge = DecodeMerge::kKernel;
                 cs.min_pages_per_warp = 1;
                 cs.lengths = skewed_lengths(78, 16, 0.6, 11, 8 * 1000 + 3);
                 return check_gpu(cs);
               }});
  return v;
}

}  // namespace

#else  // !ADAKV_HAVE_CUDA

namespace {
std::vector<NamedCheck> all_checks() {
  return {{"BuiltWithoutCuda", [] { return CheckResult{true, "adakv was built without CUDA (no nvcc)", ""}; }}};
}
}  // namespace

#endif  // ADAKV_HAVE_CUDA

ADAKV_RUN_CHECKS("DecodeAttention")
