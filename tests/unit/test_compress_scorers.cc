// Scorers (method.md section 1) against values derived by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "compress/scorers.h"

namespace adakv {
namespace {

constexpr double kTol = 1e-12;

TEST(CompressPool, MaxAndAvgWithPadding) {
  const std::vector<double> x = {1, 3, 2, 0, 5};
  const auto mx = pool_1d(x, PoolKind::kMax, 3);
  const std::vector<double> want_max = {3, 3, 3, 5, 5};
  for (size_t i = 0; i < x.size(); ++i) EXPECT_DOUBLE_EQ(mx[i], want_max[i]);
  // Avg pads with zeros and always divides by the kernel.
  const auto av = pool_1d(x, PoolKind::kAvg, 3);
  const std::vector<double> want_avg = {4.0 / 3, 2.0, 5.0 / 3, 7.0 / 3, 5.0 / 3};
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(av[i], want_avg[i], kTol);
  // Kernel 1 is the identity; kernel wider than the input still works.
  const auto id = pool_1d(x, PoolKind::kAvg, 1);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_DOUBLE_EQ(id[i], x[i]);
  const auto wide = pool_1d(x, PoolKind::kMax, 11);
  for (double v : wide) EXPECT_DOUBLE_EQ(v, 5.0);
}

// L = 4, w = 2, head_dim 1. Keys log(1..4); query head 0 has q = 1 (logits = log(j+1)), query
// head 1 has q = 0 (uniform). Window query 0 (position 2) sees keys 0..2, query 1 sees 0..3.
struct TinyCase {
  std::vector<float> q = {1.0f, 0.0f, 1.0f, 0.0f};  // [2 queries][2 heads][1]
  std::vector<float> k = {0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  HeadAttentionInputs in() const {
    HeadAttentionInputs i;
    i.queries = q.data();
    i.num_queries = 2;
    i.num_heads = 2;
    i.head_dim = 1;
    i.kv_head = 0;
    i.group = 2;
    i.keys = k.data();
    i.key_stride = 1;
    i.length = 4;
    return i;
  }
};

TEST(CompressSnapKv, WindowMeanProbsWithCausalWindow) {
  TinyCase t;
  const auto p = window_mean_probs(t.in(), 2);  // [2][4]
  // Head 0: query 0 -> (1,2,3)/6, query 1 -> (1,2,3,4)/10.
  EXPECT_NEAR(p[0], (1.0 / 6 + 1.0 / 10) / 2, 1e-7);
  EXPECT_NEAR(p[1], (2.0 / 6 + 2.0 / 10) / 2, 1e-7);
  EXPECT_NEAR(p[2], (3.0 / 6 + 3.0 / 10) / 2, 1e-7);
  EXPECT_NEAR(p[3], (0.0 + 4.0 / 10) / 2, 1e-7);  // masked for query 0
  // Head 1: uniform over the visible keys.
  EXPECT_NEAR(p[4], (1.0 / 3 + 1.0 / 4) / 2, kTol);
  EXPECT_NEAR(p[7], (0.0 + 1.0 / 4) / 2, kTol);
}

TEST(CompressSnapKv, GqaMeanAndMaxBeforePooling) {
  TinyCase t;
  const double h0_0 = (1.0 / 6 + 1.0 / 10) / 2, h0_1 = (2.0 / 6 + 2.0 / 10) / 2;  // 2/15, 4/15
  const double h1 = (1.0 / 3 + 1.0 / 4) / 2;                                      // 7/24
  auto s = snapkv_head_scores(t.in(), 2, GqaReduce::kMean, PoolKind::kMax, 1);
  ASSERT_EQ(s.size(), 2u);  // L - w prefix keys
  EXPECT_NEAR(s[0], (h0_0 + h1) / 2, 1e-7);
  EXPECT_NEAR(s[1], (h0_1 + h1) / 2, 1e-7);
  s = snapkv_head_scores(t.in(), 2, GqaReduce::kMax, PoolKind::kMax, 1);
  EXPECT_NEAR(s[0], h1, 1e-7);  // 7/24 > 2/15
  EXPECT_NEAR(s[1], h1, 1e-7);  // 7/24 > 4/15
  // Max-pool k = 3 over the two prefix scores (mean): both become the larger one.
  s = snapkv_head_scores(t.in(), 2, GqaReduce::kMean, PoolKind::kMax, 3);
  EXPECT_NEAR(s[0], (h0_1 + h1) / 2, 1e-7);
  EXPECT_NEAR(s[1], (h0_1 + h1) / 2, 1e-7);
  // Avg-pool k = 3: (0 + a + b) / 3 at both positions.
  s = snapkv_head_scores(t.in(), 2, GqaReduce::kMean, PoolKind::kAvg, 3);
  EXPECT_NEAR(s[0], ((h0_0 + h1) / 2 + (h0_1 + h1) / 2) / 3, 1e-7);
  // L <= w: nothing is scored.
  EXPECT_TRUE(snapkv_head_scores(t.in(), 4, GqaReduce::kMean, PoolKind::kMax, 7).empty());
}

TEST(CompressKvCompressMetric, SquaredProbsSummedOverWindowAndGroup) {
  TinyCase t;
  const auto m = kvcompress_head_metric(t.in(), 2, PoolKind::kMax, 1);
  ASSERT_EQ(m.size(), 4u);
  auto sq = [](double x) { return x * x; };
  EXPECT_NEAR(m[0], sq(1.0 / 6) + sq(1.0 / 10) + sq(1.0 / 3) + sq(1.0 / 4), 1e-7);
  EXPECT_NEAR(m[3], sq(4.0 / 10) + sq(1.0 / 4), 1e-7);
}

TEST(CompressH2o, AccumulatedOverAllQueries) {
  // Two queries over L = 2 keys (the queries are the row's last two tokens = all of it).
  const std::vector<float> q = {1.0f, 1.0f};  // [2][1 head][1]
  const std::vector<float> k = {0.0f, std::log(3.0f)};
  HeadAttentionInputs in;
  in.queries = q.data();
  in.num_queries = 2;
  in.num_heads = 1;
  in.head_dim = 1;
  in.group = 1;
  in.keys = k.data();
  in.key_stride = 1;
  in.length = 2;
  const auto acc = accumulated_probs(in, GqaReduce::kMean);
  EXPECT_NEAR(acc[0], 1.0 + 0.25, 1e-7);  // query 0 sees only key 0
  EXPECT_NEAR(acc[1], 0.75, 1e-7);
}

TEST(CompressCritical, ProjectedValueNorm) {
  // H = 2, Hkv = 1, d = 2, hidden = 2. o_proj [hidden][H*d].
  const std::vector<float> o_proj = {1.0f, 2.0f, 0.0f, 1.0f,    // out 0
                                     -3.0f, 0.5f, 2.0f, 0.0f};  // out 1
  const std::vector<float> v = {1.0f, -1.0f};
  // Head 0: W^0 v = (1 - 2, -3 - 0.5) -> L1 4.5. Head 1: (0 - 1, 2 - 0) -> L1 3. Mean 3.75.
  const auto n = critical_value_norms(v.data(), 2, 1, o_proj.data(), 2, 2, 2, 0, 2);
  ASSERT_EQ(n.size(), 1u);
  EXPECT_NEAR(n[0], 3.75, kTol);
}

TEST(CompressRandom, SplitMixAndDeterministicScores) {
  // The first output of SplitMix64 seeded with 0 (Vigna's reference implementation).
  EXPECT_EQ(splitmix64(0), 0xE220A8397B1DCDAFull);
  const auto a = random_scores(42, 3, 1, 1000);
  EXPECT_EQ(a, random_scores(42, 3, 1, 1000));
  EXPECT_NE(a, random_scores(42, 3, 0, 1000));
  EXPECT_NE(a, random_scores(43, 3, 1, 1000));
  std::set<float> distinct(a.begin(), a.end());
  EXPECT_GT(distinct.size(), 990u);
  double mean = 0;
  for (float x : a) {
    EXPECT_GE(x, 0.0f);
    EXPECT_LT(x, 1.0f);
    mean += x;
  }
  EXPECT_NEAR(mean / 1000, 0.5, 0.05);
}

}  // namespace
}  // namespace adakv
