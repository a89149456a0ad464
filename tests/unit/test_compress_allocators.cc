// Allocation and selection (method.md section 2) against hand-derived values.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "compress/allocators.h"

namespace adakv {
namespace {

int64_t sum(const std::vector<int32_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

TEST(CompressSelection, TopKBreaksTiesByLowerPosition) {
  const std::vector<float> s = {0.5f, 0.9f, 0.5f, 0.1f, 0.9f, 0.5f};
  EXPECT_EQ(top_k_indices(s, 0), (std::vector<int32_t>{}));
  EXPECT_EQ(top_k_indices(s, 1), (std::vector<int32_t>{1}));
  EXPECT_EQ(top_k_indices(s, 2), (std::vector<int32_t>{1, 4}));
  EXPECT_EQ(top_k_indices(s, 3), (std::vector<int32_t>{0, 1, 4}));  // 0.5 at 0 beats 0.5 at 2, 5
  EXPECT_EQ(top_k_indices(s, 4), (std::vector<int32_t>{0, 1, 2, 4}));
  EXPECT_EQ(top_k_indices(s, 99), (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(rank_descending(s), (std::vector<int32_t>{1, 4, 0, 2, 5, 3}));
}

TEST(CompressSelection, GlobalTopKTiesGoToLowerHead) {
  const HeadScores s = {{1.0f, 1.0f, 1.0f}, {1.0f, 1.0f, 1.0f}};
  EXPECT_EQ(global_top_k_counts(s, 4), (std::vector<int32_t>{3, 1}));
}

TEST(CompressSelection, GlobalTopKTieOnSecondPlace) {
  // 0.9 (h1) first; 0.7 appears in h0 and h1: the lower head wins the tie.
  const HeadScores t = {{0.1f, 0.7f}, {0.7f, 0.9f, 0.2f}};
  EXPECT_EQ(global_top_k_counts(t, 2), (std::vector<int32_t>{1, 1}));
}

TEST(CompressAda, BudgetsFromCountsWithShortfallFixUp) {
  // Hkv = 2, n = 5, Bs = 3, alpha = 0.2: f = floor(0.6) = 0, target 6.
  // Top-6: h0 {0.9, 0.8, 0.7}, h1 {0.6, 0.5, 0.2} -> c = (3, 3); round(2.4) = 2 each -> sum 4.
  // Shortfall 2: h0's next (0.7) beats h1's next (0.2); then h1's 0.2 beats h0's 0.1.
  const HeadScores s = {{0.9f, 0.8f, 0.7f, 0.1f, 0.05f}, {0.6f, 0.5f, 0.2f, 0.15f, 0.0f}};
  const AdaAllocation a = ada_allocate(s, 3, 0.2);
  EXPECT_EQ(a.floor, 0);
  EXPECT_EQ(a.counts, (std::vector<int32_t>{3, 3}));
  EXPECT_EQ(a.rounded, (std::vector<int32_t>{2, 2}));  // the reference stops here (sum 4)
  EXPECT_EQ(a.budgets, (std::vector<int32_t>{3, 3}));
}

TEST(CompressAda, SkewedHeadsAndHalfToEvenRounding) {
  const HeadScores s = {{0.9f, 0.8f, 0.7f, 0.6f, 0.5f}, {0.1f, 0.09f, 0.08f, 0.07f, 0.06f}};
  // Bs = 3, alpha = 0.2: c = (5, 1); round(4.0) = 4, round(0.8) = 1 -> 5; +1 to h0 (0.5 > 0.09).
  AdaAllocation a = ada_allocate(s, 3, 0.2);
  EXPECT_EQ(a.counts, (std::vector<int32_t>{5, 1}));
  EXPECT_EQ(a.rounded, (std::vector<int32_t>{4, 1}));
  EXPECT_EQ(a.budgets, (std::vector<int32_t>{5, 1}));
  // Bs = 4, alpha = 0.5: f = 2, target 8, c = (5, 3): 0.5*5+2 = 4.5 -> 4, 0.5*3+2 = 3.5 -> 4
  // (half to even both ways), sum 8 already.
  a = ada_allocate(s, 4, 0.5);
  EXPECT_EQ(a.floor, 2);
  EXPECT_EQ(a.counts, (std::vector<int32_t>{5, 3}));
  EXPECT_EQ(a.rounded, (std::vector<int32_t>{4, 4}));
  EXPECT_EQ(a.budgets, (std::vector<int32_t>{4, 4}));
}

TEST(CompressAda, ExcessIsTakenFromTheWorstSelection) {
  // Hkv = 3, n = 8, Bs = 5, alpha = 0.2: f = 1, target 15; c = (2, 7, 6).
  // Rounded: 0.8*2+1 = 2.6 -> 3, 0.8*7+1 = 6.6 -> 7, 0.8*6+1 = 5.8 -> 6: sum 16, excess 1.
  // Worst selected: h0's third (0.10) < h2's sixth (0.75) < h1's seventh (0.84): h0 gives it back.
  const HeadScores s = {{0.95f, 0.94f, 0.10f, 0.09f, 0.08f, 0.07f, 0.06f, 0.05f},
                        {0.90f, 0.89f, 0.88f, 0.87f, 0.86f, 0.85f, 0.84f, 0.03f},
                        {0.80f, 0.79f, 0.78f, 0.77f, 0.76f, 0.75f, 0.04f, 0.02f}};
  const AdaAllocation a = ada_allocate(s, 5, 0.2);
  EXPECT_EQ(a.counts, (std::vector<int32_t>{2, 7, 6}));
  EXPECT_EQ(a.rounded, (std::vector<int32_t>{3, 7, 6}));
  EXPECT_EQ(a.budgets, (std::vector<int32_t>{2, 7, 6}));
}

TEST(CompressAda, FloorHoldsForAStarvedHead) {
  // Head 0 wins every slot of the global top-20; alpha = 0.2, Bs = 10 -> f = 2 for head 1.
  HeadScores s(2, std::vector<float>(20));
  for (int j = 0; j < 20; ++j) {
    s[0][static_cast<size_t>(j)] = 1.0f + static_cast<float>(j);
    s[1][static_cast<size_t>(j)] = 0.01f * static_cast<float>(j);
  }
  const AdaAllocation a = ada_allocate(s, 10, 0.2);
  EXPECT_EQ(a.counts, (std::vector<int32_t>{20, 0}));
  EXPECT_EQ(a.budgets, (std::vector<int32_t>{18, 2}));  // 0.8*20+2, 0.8*0+2
  // alpha = 1: the floor is the whole budget -> uniform.
  EXPECT_EQ(ada_allocate(s, 10, 1.0).budgets, (std::vector<int32_t>{10, 10}));
  // alpha = 0: pure global top-k.
  EXPECT_EQ(ada_allocate(s, 10, 0.0).budgets, (std::vector<int32_t>{20, 0}));
}

TEST(CompressAda, ClampsToShortHeadsAndKeepsAllWhenBudgetCoversEverything) {
  // Ragged: head 0 has 3 candidates, head 1 has 30; Bs = 10 -> target 20 of 33.
  HeadScores s = {{0.9f, 0.9f, 0.9f}, std::vector<float>(30)};
  for (int j = 0; j < 30; ++j) s[1][static_cast<size_t>(j)] = 0.5f - 0.01f * static_cast<float>(j);
  AdaAllocation a = ada_allocate(s, 10, 0.2);
  EXPECT_EQ(a.counts, (std::vector<int32_t>{3, 17}));
  EXPECT_EQ(a.rounded, (std::vector<int32_t>{3, 16}));  // round(4.4) = 4 clamped to 3
  EXPECT_EQ(a.budgets, (std::vector<int32_t>{3, 17}));
  // Total candidates <= Hkv * Bs: every head keeps all (B >= L).
  a = ada_allocate({{0.1f, 0.2f}, {0.3f}}, 2, 0.2);
  EXPECT_EQ(a.budgets, (std::vector<int32_t>{2, 1}));
}

TEST(CompressAda, RandomisedSumsFloorsAndClamps) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 400; ++trial) {
    const int heads = std::uniform_int_distribution<int>(1, 8)(rng);
    const int bs = std::uniform_int_distribution<int>(0, 40)(rng);
    const double alpha = std::uniform_int_distribution<int>(0, 10)(rng) / 10.0;
    const bool ragged = trial % 3 == 0;
    HeadScores s(static_cast<size_t>(heads));
    int64_t total = 0;
    for (auto& h : s) {
      const int n = ragged ? std::uniform_int_distribution<int>(0, 80)(rng) : 60;
      h.resize(static_cast<size_t>(n));
      // Coarse values: many exact ties.
      for (float& x : h) x = static_cast<float>(std::uniform_int_distribution<int>(0, 20)(rng)) / 20.0f;
      total += n;
    }
    const AdaAllocation a = ada_allocate(s, bs, alpha);
    const int64_t target = static_cast<int64_t>(heads) * bs;
    const int32_t f = static_cast<int32_t>(std::floor(alpha * bs));
    if (total <= target) {
      for (int h = 0; h < heads; ++h) EXPECT_EQ(a.budgets[static_cast<size_t>(h)], static_cast<int32_t>(s[static_cast<size_t>(h)].size()));
      continue;
    }
    EXPECT_EQ(sum(a.counts), target);
    EXPECT_EQ(sum(a.budgets), target) << "trial " << trial;
    for (int h = 0; h < heads; ++h) {
      const int32_t n = static_cast<int32_t>(s[static_cast<size_t>(h)].size());
      EXPECT_GE(a.budgets[static_cast<size_t>(h)], std::min(f, n)) << "floor, trial " << trial;
      EXPECT_LE(a.budgets[static_cast<size_t>(h)], n);
      EXPECT_GE(a.budgets[static_cast<size_t>(h)], 0);
    }
    // Deterministic: same inputs, same answer.
    EXPECT_EQ(ada_allocate(s, bs, alpha).budgets, a.budgets);
  }
}

TEST(CompressPyramid, ReferenceRoundingOvershootsTheMean) {
  // 32 layers, B = 128, w = 32: Bs = 96, min = 4, max = 188, step = floor(184 / 31) = 5.
  const auto ref = pyramid_schedule(32, 96, 100000, 20, true);
  ASSERT_EQ(ref.size(), 32u);
  for (int l = 0; l < 32; ++l) EXPECT_EQ(ref[static_cast<size_t>(l)], 188 - 5 * l);
  EXPECT_EQ(sum(ref), 32 * 188 - 5 * (31 * 32 / 2));  // mean 110.5 = Bs * 1.151
  // Renormalised (default): mean exactly Bs, from max down to min, never increasing.
  const auto s = pyramid_schedule(32, 96, 100000, 20, false);
  EXPECT_EQ(sum(s), 32 * 96);
  EXPECT_EQ(s.front(), 188);
  EXPECT_EQ(s.back(), 4);
  for (size_t l = 1; l < s.size(); ++l) EXPECT_LE(s[l], s[l - 1]);
}

TEST(CompressPyramid, SmallScheduleByHand) {
  // N = 4, Bs = 10, beta = 20: min = 0, max = 20. Reference step 6: 20 14 8 2 (mean 11).
  EXPECT_EQ(pyramid_schedule(4, 10, 1000, 20, true), (std::vector<int32_t>{20, 14, 8, 2}));
  // Exact x_l = 20, 13.33, 6.67, 0: floors 20 13 6 0 (39), one more to the largest fraction (l = 2).
  EXPECT_EQ(pyramid_schedule(4, 10, 1000, 20, false), (std::vector<int32_t>{20, 13, 7, 0}));
}

TEST(CompressPyramid, ClampAtPromptLength) {
  // prefix = L - w = 150 < max 188: max = 150, min = 2*96 - 150 = 42.
  const auto s = pyramid_schedule(32, 96, 150, 20, false);
  EXPECT_EQ(s.front(), 150);
  EXPECT_EQ(s.back(), 42);
  EXPECT_EQ(sum(s), 32 * 96);
  const auto ref = pyramid_schedule(32, 96, 150, 20, true);  // step floor(108 / 31) = 3
  EXPECT_EQ(ref.front(), 150);
  EXPECT_EQ(ref.back(), 150 - 3 * 31);
  // Bs >= prefix: every layer keeps its whole prefix.
  for (int32_t b : pyramid_schedule(8, 96, 90, 20, false)) EXPECT_EQ(b, 90);
  for (int32_t b : pyramid_schedule(8, 96, 90, 20, true)) EXPECT_EQ(b, 90);
  // One layer: Bs.
  EXPECT_EQ(pyramid_schedule(1, 96, 1000, 20, false), (std::vector<int32_t>{96}));
}

TEST(CompressPyramid, MeanIsExactForManyShapes) {
  for (int n = 2; n <= 40; n += 3)
    for (int bs : {0, 1, 7, 96, 480})
      for (int prefix : {bs, bs + 1, 2 * bs, 10000})
        for (int beta : {1, 20, 1000}) {
          const auto s = pyramid_schedule(n, bs, prefix, beta, false);
          EXPECT_EQ(sum(s), static_cast<int64_t>(n) * std::min(bs, prefix)) << n << " " << bs << " " << prefix;
          for (int32_t b : s) {
            EXPECT_GE(b, 0);
            EXPECT_LE(b, prefix);
          }
        }
}

TEST(CompressUniform, ClampsToCandidates) {
  EXPECT_EQ(uniform_allocate(std::vector<int32_t>{0, 5, 100}, 10), (std::vector<int32_t>{0, 5, 10}));
}

}  // namespace
}  // namespace adakv
