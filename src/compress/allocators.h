// Budget allocation and selection (method.md section 2): which head keeps how many entries, and
// which ones. Ties everywhere break deterministically: higher score, then lower head, then lower
// position (method.md section 4).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace adakv {

// Ragged per-head scores of one layer: [Hkv][n_h], n_h = the head's candidate (prefix) entries.
using HeadScores = std::vector<std::vector<float>>;

// Entry indices of the k best scores (higher score, then lower index), ascending. k is clamped
// to [0, scores.size()].
std::vector<int32_t> top_k_indices(std::span<const float> scores, int64_t k);
// All indices from best to worst under the same rule.
std::vector<int32_t> rank_descending(std::span<const float> scores);
// Ada-KV step 2: of the global top-k over all heads (higher score, lower head, lower position),
// how many belong to each head: c_h, sum c_h = min(k, total candidates).
std::vector<int32_t> global_top_k_counts(const HeadScores& scores, int64_t k);

// 2.1: every head selects min(bs, n_h).
std::vector<int32_t> uniform_allocate(std::span<const int32_t> candidates, int32_t bs);

// 2.2: Ada-KV allocation of one layer for selection budget bs (= B - w, or a pyramid Bs_l).
struct AdaAllocation {
  int32_t floor = 0;              // f = floor(alpha * bs)
  std::vector<int32_t> counts;    // [Hkv] c_h from the global top-(Hkv * bs)
  std::vector<int32_t> rounded;   // [Hkv] round((1 - alpha) c_h + f) clamped to [0, n_h] (the reference's B_h)
  std::vector<int32_t> budgets;   // [Hkv] B_h after the exact-sum fix-up
};
// When sum n_h <= Hkv * bs every head keeps all its candidates (counts = rounded = budgets = n_h).
// Otherwise sum budgets == Hkv * bs exactly and budgets[h] >= min(f, n_h). Rounding is half to
// even (numpy / torch round). Fix-up: a shortfall goes one entry at a time to the head whose
// next unselected candidate is best (global order); an excess is taken one at a time from the
// head whose worst selected candidate is worst, never below min(f, n_h).
AdaAllocation ada_allocate(const HeadScores& scores, int32_t bs, double alpha);

// 2.3: PyramidKV selection budget Bs_l of every layer (layer 0 first, lower layers keep more).
// prefix = L - w. Default: the linear schedule from max to min (min, max as method.md, with the
// clamp at L - w) rounded so that sum Bs_l == num_layers * bs exactly (largest remainder, ties to
// the lower layer). reference_rounding: the reference's floored step, Bs_l = max - l * step.
// One layer: {bs}. Values are clamped to [0, prefix] (only reachable when bs >= prefix, i.e.
// nothing is compressed anyway).
std::vector<int32_t> pyramid_schedule(int32_t num_layers, int32_t bs, int32_t prefix, int32_t beta,
                                      bool reference_rounding);

}  // namespace adakv
