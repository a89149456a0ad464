#include "compress/allocators.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/check.h"

namespace adakv {

namespace {

// Candidate (head, position) with its score; `better` is the global keep order.
struct Candidate {
  float score;
  int32_t head;
  int32_t pos;
};

bool better(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.head != b.head) return a.head < b.head;
  return a.pos < b.pos;
}

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

}  // namespace

std::vector<int32_t> rank_descending(std::span<const float> scores) {
  std::vector<int32_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
    const float sa = scores[static_cast<size_t>(a)], sb = scores[static_cast<size_t>(b)];
    if (sa != sb) return sa > sb;
    return a < b;
  });
  return idx;
}

std::vector<int32_t> top_k_indices(std::span<const float> scores, int64_t k) {
  const int64_t n = static_cast<int64_t>(scores.size());
  k = std::clamp<int64_t>(k, 0, n);
  std::vector<int32_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  auto cmp = [&](int32_t a, int32_t b) {
    const float sa = scores[static_cast<size_t>(a)], sb = scores[static_cast<size_t>(b)];
    if (sa != sb) return sa > sb;
    return a < b;
  };
  if (k < n) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), cmp);
  idx.resize(static_cast<size_t>(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<int32_t> global_top_k_counts(const HeadScores& scores, int64_t k) {
  std::vector<Candidate> all;
  for (size_t h = 0; h < scores.size(); ++h)
    for (size_t j = 0; j < scores[h].size(); ++j)
      all.push_back({scores[h][j], static_cast<int32_t>(h), static_cast<int32_t>(j)});
  k = std::clamp<int64_t>(k, 0, static_cast<int64_t>(all.size()));
  if (k < static_cast<int64_t>(all.size())) std::nth_element(all.begin(), all.begin() + k, all.end(), better);
  std::vector<int32_t> counts(scores.size(), 0);
  for (int64_t i = 0; i < k; ++i) ++counts[static_cast<size_t>(all[static_cast<size_t>(i)].head)];
  return counts;
}

std::vector<int32_t> uniform_allocate(std::span<const int32_t> candidates, int32_t bs) {
  std::vector<int32_t> out(candidates.size());
  for (size_t h = 0; h < candidates.size(); ++h) out[h] = std::clamp(bs, 0, candidates[h]);
  return out;
}

AdaAllocation ada_allocate(const HeadScores& scores, int32_t bs, double alpha) {
  ADAKV_CHECK(bs >= 0, "selection budget must be >= 0");
  ADAKV_CHECK(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1]");
  const size_t num_heads = scores.size();
  AdaAllocation a;
  a.floor = static_cast<int32_t>(std::floor(alpha * bs));
  std::vector<int32_t> n(num_heads);
  int64_t total = 0;
  for (size_t h = 0; h < num_heads; ++h) {
    n[h] = static_cast<int32_t>(scores[h].size());
    total += n[h];
  }
  const int64_t target = static_cast<int64_t>(num_heads) * bs;
  if (total <= target) {  // B >= L: nothing to compress
    a.counts = a.rounded = a.budgets = n;
    return a;
  }
  a.counts = global_top_k_counts(scores, target);
  a.rounded.resize(num_heads);
  for (size_t h = 0; h < num_heads; ++h) {
    // nearbyint rounds half to even in the default rounding mode, like numpy and torch.
    const double b = std::nearbyint((1.0 - alpha) * a.counts[h] + a.floor);
    a.rounded[h] = static_cast<int32_t>(std::clamp<double>(b, 0.0, n[h]));
  }
  a.budgets = a.rounded;

  // Exact-sum fix-up (method.md 2.2 step 3, "Decision").
  std::vector<std::vector<int32_t>> rank(num_heads);  // [Hkv][n_h] best first
  for (size_t h = 0; h < num_heads; ++h) rank[h] = rank_descending(scores[h]);
  int64_t sum = std::accumulate(a.budgets.begin(), a.budgets.end(), int64_t{0});
  while (sum < target) {
    int32_t pick = -1;
    Candidate best{};
    for (size_t h = 0; h < num_heads; ++h) {
      if (a.budgets[h] >= n[h]) continue;
      const int32_t pos = rank[h][static_cast<size_t>(a.budgets[h])];
      const Candidate c{scores[h][static_cast<size_t>(pos)], static_cast<int32_t>(h), pos};
      if (pick < 0 || better(c, best)) {
        pick = static_cast<int32_t>(h);
        best = c;
      }
    }
    ADAKV_CHECK(pick >= 0, "Ada fix-up: no head can take the shortfall");
    ++a.budgets[static_cast<size_t>(pick)];
    ++sum;
  }
  while (sum > target) {
    int32_t pick = -1;
    Candidate worst{};
    for (size_t h = 0; h < num_heads; ++h) {
      if (a.budgets[h] <= std::min(a.floor, n[h])) continue;
      const int32_t pos = rank[h][static_cast<size_t>(a.budgets[h] - 1)];
      const Candidate c{scores[h][static_cast<size_t>(pos)], static_cast<int32_t>(h), pos};
      if (pick < 0 || better(worst, c)) {
        pick = static_cast<int32_t>(h);
        worst = c;
      }
    }
    ADAKV_CHECK(pick >= 0, "Ada fix-up: no head can give up the excess");
    --a.budgets[static_cast<size_t>(pick)];
    --sum;
  }
  return a;
}

std::vector<int32_t> pyramid_schedule(int32_t num_layers, int32_t bs, int32_t prefix, int32_t beta,
                                      bool reference_rounding) {
  ADAKV_CHECK(num_layers >= 1 && beta >= 1 && bs >= 0 && prefix >= 0, "pyramid_schedule arguments");
  std::vector<int32_t> out(static_cast<size_t>(num_layers));
  if (num_layers == 1) {
    out[0] = std::clamp(bs, 0, prefix);
    return out;
  }
  int64_t mn = bs / beta;
  int64_t mx = 2 * static_cast<int64_t>(bs) - mn;
  if (mx >= prefix) {
    mx = prefix;
    mn = 2 * static_cast<int64_t>(bs) - mx;
  }
  const int64_t den = num_layers - 1;
  if (reference_rounding) {
    const int64_t step = floor_div(mx - mn, den);
    for (int32_t l = 0; l < num_layers; ++l) out[static_cast<size_t>(l)] = static_cast<int32_t>(std::clamp<int64_t>(mx - l * step, 0, prefix));
    return out;
  }
  // Exact linear schedule x_l = mx - l (mx - mn) / (N - 1); sum x_l = N (mx + mn) / 2 = N bs.
  std::vector<int64_t> base(static_cast<size_t>(num_layers)), frac(static_cast<size_t>(num_layers));
  int64_t sum = 0;
  for (int32_t l = 0; l < num_layers; ++l) {
    const int64_t num = mx * den - static_cast<int64_t>(l) * (mx - mn);
    base[static_cast<size_t>(l)] = floor_div(num, den);
    frac[static_cast<size_t>(l)] = num - base[static_cast<size_t>(l)] * den;
    sum += base[static_cast<size_t>(l)];
  }
  int64_t remainder = static_cast<int64_t>(num_layers) * bs - sum;
  ADAKV_CHECK(remainder >= 0 && remainder < num_layers, "pyramid remainder out of range");
  std::vector<int32_t> order(static_cast<size_t>(num_layers));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return frac[static_cast<size_t>(a)] > frac[static_cast<size_t>(b)];
  });
  for (int64_t i = 0; i < remainder; ++i) ++base[static_cast<size_t>(order[static_cast<size_t>(i)])];
  for (int32_t l = 0; l < num_layers; ++l) out[static_cast<size_t>(l)] = static_cast<int32_t>(std::clamp<int64_t>(base[static_cast<size_t>(l)], 0, prefix));
  return out;
}

}  // namespace adakv
