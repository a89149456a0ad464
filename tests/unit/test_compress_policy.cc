// The policy layer: config validation, plans from scores (window kept, L <= B, L <= w, ties,
// two-stage CriticalKV, StreamingLLM), and compute_layer_scores edge cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "compress/policy.h"

namespace adakv {
namespace {

std::vector<int32_t> iota_vec(int32_t from, int32_t to) {
  std::vector<int32_t> v;
  for (int32_t i = from; i < to; ++i) v.push_back(i);
  return v;
}

CompressConfig config(KvPolicy p, int32_t budget, int32_t window) {
  CompressConfig c;
  c.policy = p;
  c.budget = budget;
  c.window = window;
  return c;
}

TEST(CompressConfig, RefusesOutOfRangeValuesWithTheRange) {
  CompressConfig c = config(KvPolicy::kAdaSnapKv, 128, 32);
  EXPECT_TRUE(validate_compress_config(c).is_ok());
  auto msg = [](const CompressConfig& x) { return validate_compress_config(x).message(); };
  c.budget = 32;  // B <= w
  EXPECT_NE(msg(c).find("--kv-budget 32 is out of range"), std::string::npos) << msg(c);
  EXPECT_NE(msg(c).find("[33, "), std::string::npos) << msg(c);
  c.budget = 33;
  EXPECT_TRUE(validate_compress_config(c).is_ok());
  c.pool_kernel = 4;
  EXPECT_NE(msg(c).find("--kv-pool-kernel 4"), std::string::npos);
  EXPECT_NE(msg(c).find("odd"), std::string::npos);
  c.pool_kernel = 0;
  EXPECT_FALSE(validate_compress_config(c).is_ok());
  c.pool_kernel = 1;
  EXPECT_TRUE(validate_compress_config(c).is_ok());
  c.alpha = 1.5;
  EXPECT_NE(msg(c).find("--kv-alpha"), std::string::npos);
  EXPECT_NE(msg(c).find("[0, 1]"), std::string::npos);
  c.alpha = -0.1;
  EXPECT_FALSE(validate_compress_config(c).is_ok());
  c.alpha = 1.0;
  EXPECT_TRUE(validate_compress_config(c).is_ok());
  c.beta = 0;
  EXPECT_NE(msg(c).find("--kv-beta 0"), std::string::npos);
  c.beta = 20;
  c.window = 0;
  EXPECT_NE(msg(c).find("--kv-window 0"), std::string::npos);
  c.window = 32;
  c.interval = 0;
  EXPECT_NE(msg(c).find("--kv-interval 0"), std::string::npos);
  c.interval = 16;
  c.protected_window = -1;
  EXPECT_NE(msg(c).find("--kv-protected-window -1"), std::string::npos);
  c.protected_window = 32;
  // StreamingLLM: window irrelevant, sink < budget.
  CompressConfig s = config(KvPolicy::kStreamingLlm, 8, 32);
  s.sink = 4;
  EXPECT_TRUE(validate_compress_config(s).is_ok());
  s.sink = 8;
  EXPECT_NE(msg(s).find("--kv-sink 8"), std::string::npos);
  EXPECT_NE(msg(s).find("[0, 7]"), std::string::npos) << msg(s);
  // KV-Compress: T from --kv-max-cache-tokens or the budget.
  CompressConfig k = config(KvPolicy::kKvCompress, 0, 32);
  EXPECT_FALSE(validate_compress_config(k).is_ok());
  k.max_cache_tokens = 64;
  EXPECT_TRUE(validate_compress_config(k).is_ok());
  k.max_cache_tokens = -3;
  EXPECT_NE(msg(k).find("--kv-max-cache-tokens -3"), std::string::npos);
  // Full ignores the budget.
  EXPECT_TRUE(validate_compress_config(config(KvPolicy::kFull, 0, 32)).is_ok());
}

TEST(CompressConfig, ParsesNames) {
  for (const char* name : {"full", "streamingllm", "h2o", "snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv",
                           "criticalkv", "ada-criticalkv", "kvcompress", "random"}) {
    auto p = parse_kv_policy(name);
    ASSERT_TRUE(p.has_value()) << name;
    EXPECT_STREQ(kv_policy_name(*p), name);
  }
  auto bad = parse_kv_policy("snap");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.status().message().find("ada-snapkv"), std::string::npos);
  EXPECT_EQ(*parse_pool_kind("avg"), PoolKind::kAvg);
  EXPECT_FALSE(parse_pool_kind("min").has_value());
  EXPECT_EQ(*parse_gqa_reduce("max"), GqaReduce::kMax);
  EXPECT_FALSE(parse_gqa_reduce("sum").has_value());
}

LayerScores random_layer(std::mt19937& rng, std::vector<int32_t> lengths, int32_t window, bool coarse) {
  LayerScores s;
  s.lengths = lengths;
  for (int32_t L : lengths) {
    std::vector<float> sc(static_cast<size_t>(std::max(0, L - window)));
    for (float& x : sc)
      x = coarse ? static_cast<float>(std::uniform_int_distribution<int>(0, 5)(rng))
                 : std::uniform_real_distribution<float>(0, 1)(rng);
    s.scores.push_back(sc);
    s.crit.push_back(sc);
  }
  return s;
}

TEST(CompressPlan, WindowAlwaysKeptAndBudgetsExact) {
  std::mt19937 rng(3);
  for (KvPolicy p : {KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv, KvPolicy::kCriticalKv, KvPolicy::kAdaCriticalKv}) {
    for (int trial = 0; trial < 50; ++trial) {
      const int32_t w = std::uniform_int_distribution<int>(1, 12)(rng);
      const int32_t B = w + std::uniform_int_distribution<int>(1, 30)(rng);
      const int32_t L = std::uniform_int_distribution<int>(1, 80)(rng);
      const int32_t hkv = std::uniform_int_distribution<int>(1, 4)(rng);
      CompressConfig c = config(p, B, w);
      LayerScores s = random_layer(rng, std::vector<int32_t>(static_cast<size_t>(hkv), L), w, trial % 2 == 0);
      const LayerPlan plan = plan_layer(c, 0, B - w, s);
      int64_t kept = 0;
      for (int32_t h = 0; h < hkv; ++h) {
        const auto& keep = plan.keep[static_cast<size_t>(h)];
        EXPECT_TRUE(std::is_sorted(keep.begin(), keep.end()));
        EXPECT_EQ(std::adjacent_find(keep.begin(), keep.end()), keep.end());
        // The last min(w, L) entries are always there.
        for (int32_t j = std::max(0, L - w); j < L; ++j) EXPECT_TRUE(std::binary_search(keep.begin(), keep.end(), j));
        kept += static_cast<int64_t>(keep.size());
        if (!policy_is_adaptive(p)) {
          EXPECT_EQ(static_cast<int32_t>(keep.size()), std::min(L, B));
        }
      }
      // L <= B keeps everything; otherwise exactly Hkv * B entries in the layer.
      EXPECT_EQ(kept, static_cast<int64_t>(hkv) * std::min(L, B)) << kv_policy_name(p) << " L " << L << " B " << B;
      EXPECT_EQ(plan.compressed, L > B);
    }
  }
}

TEST(CompressPlan, LShorterThanBudgetOrWindowKeepsEverything) {
  std::mt19937 rng(5);
  for (KvPolicy p : {KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv, KvPolicy::kPyramidKv, KvPolicy::kH2o, KvPolicy::kRandom}) {
    CompressConfig c = config(p, 40, 32);
    for (int32_t L : {0, 1, 31, 32, 33, 39, 40}) {
      LayerScores s = random_layer(rng, {L, L}, 32, false);
      const int32_t bs = layer_selection_budget(c, 4, 3, L);
      const LayerPlan plan = plan_layer(c, 3, bs, s);
      EXPECT_FALSE(plan.compressed);
      EXPECT_EQ(plan.keep[0], iota_vec(0, L));
      EXPECT_EQ(plan.keep[1], iota_vec(0, L));
    }
  }
}

TEST(CompressPlan, TiesGoToLowerPositionAndLowerHead) {
  CompressConfig c = config(KvPolicy::kSnapKv, 5, 2);  // Bs = 3
  LayerScores s;
  s.lengths = {10, 10};
  s.scores = {std::vector<float>(8, 1.0f), std::vector<float>(8, 1.0f)};
  LayerPlan plan = plan_layer(c, 0, 3, s);
  EXPECT_EQ(plan.keep[0], (std::vector<int32_t>{0, 1, 2, 8, 9}));
  EXPECT_EQ(plan.keep[1], (std::vector<int32_t>{0, 1, 2, 8, 9}));
  // Ada: the global top-6 tie goes to head 0 entirely: c = (6, 0); alpha 0.2: f = 0,
  // round(4.8) = 5, round(0) = 0; the shortfall tie (h0 pos 5 vs h1 pos 0) goes to head 0.
  c.policy = KvPolicy::kAdaSnapKv;
  plan = plan_layer(c, 0, 3, s);
  EXPECT_EQ(plan.counts, (std::vector<int32_t>{6, 0}));
  EXPECT_EQ(plan.budgets, (std::vector<int32_t>{6, 0}));
  EXPECT_EQ(plan.keep[0], (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 8, 9}));
  EXPECT_EQ(plan.keep[1], (std::vector<int32_t>{8, 9}));
}

TEST(CompressPlan, CriticalTwoStageSelection) {
  CompressConfig c = config(KvPolicy::kCriticalKv, 6, 2);  // Bs = 4
  LayerScores s;
  s.lengths = {8};
  s.scores = {{0.9f, 0.8f, 0.1f, 0.2f, 0.3f, 0.05f}};
  s.crit = {{0.0f, 0.0f, 5.0f, 1.0f, 2.0f, 9.0f}};
  // Stage 1: floor(4/2) = 2 by S -> {0, 1}; stage 2: 2 by crit among {2..5} -> {5, 2}.
  const LayerPlan plan = plan_layer(c, 0, 4, s);
  EXPECT_EQ(plan.keep[0], (std::vector<int32_t>{0, 1, 2, 5, 6, 7}));
  // Odd budget 3: stage 1 takes 1 ({0}), stage 2 takes 2 ({5, 2}).
  EXPECT_EQ(plan_layer(c, 0, 3, s).keep[0], (std::vector<int32_t>{0, 2, 5, 6, 7}));
}

TEST(CompressPlan, AdaRaggedHeadsClampToTheirLength) {
  // Head 0 has only 1 candidate; head 1 has 20. Bs = 4: target 8 of 21.
  CompressConfig c = config(KvPolicy::kAdaSnapKv, 6, 2);
  LayerScores s;
  s.lengths = {3, 22};
  s.scores = {{1.0f}, std::vector<float>(20)};
  for (int j = 0; j < 20; ++j) s.scores[1][static_cast<size_t>(j)] = 0.5f - 0.01f * static_cast<float>(j);
  const LayerPlan plan = plan_layer(c, 0, 4, s);
  EXPECT_EQ(plan.budgets, (std::vector<int32_t>{1, 7}));
  EXPECT_EQ(plan.keep[0], (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(plan.keep[1], (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 20, 21}));
}

TEST(CompressPlan, PyramidLayerBudgets) {
  CompressConfig c = config(KvPolicy::kPyramidKv, 12, 2);  // Bs = 10
  // 4 layers, L = 1002: schedule 20 13 7 0 (see the allocator test).
  EXPECT_EQ(layer_selection_budget(c, 4, 0, 1002), 20);
  EXPECT_EQ(layer_selection_budget(c, 4, 2, 1002), 7);
  EXPECT_EQ(layer_selection_budget(c, 4, 3, 1002), 0);
  c.pyramid_reference_rounding = true;
  EXPECT_EQ(layer_selection_budget(c, 4, 3, 1002), 2);
  c.policy = KvPolicy::kSnapKv;
  EXPECT_EQ(layer_selection_budget(c, 4, 3, 1002), 10);
  // A layer with Bs_l = 0 keeps only the window.
  c.policy = KvPolicy::kPyramidKv;
  c.pyramid_reference_rounding = false;
  std::mt19937 rng(1);
  LayerScores s = random_layer(rng, {1002}, 2, false);
  EXPECT_EQ(plan_layer(c, 3, 0, s).keep[0], (std::vector<int32_t>{1000, 1001}));
}

TEST(CompressPlan, StreamingKeepsSinkAndRecent) {
  CompressConfig c = config(KvPolicy::kStreamingLlm, 8, 32);
  c.sink = 2;
  const std::vector<int32_t> lengths = {20, 8, 3};
  const LayerPlan plan = plan_streaming(c, 0, lengths);
  EXPECT_EQ(plan.keep[0], (std::vector<int32_t>{0, 1, 14, 15, 16, 17, 18, 19}));
  EXPECT_EQ(plan.keep[1], iota_vec(0, 8));
  EXPECT_EQ(plan.keep[2], iota_vec(0, 3));
  c.sink = 0;
  EXPECT_EQ(plan_streaming(c, 0, lengths).keep[0], iota_vec(12, 20));
}

TEST(CompressScores, MissingInputsAreReported) {
  std::vector<float> q(4 * 2 * 4, 0.1f), k(10 * 4, 0.2f);
  LayerTensors t;
  t.num_heads = 2;
  t.num_kv_heads = 1;
  t.head_dim = 4;
  t.queries = q.data() + 4 * 2 * 4 - 2 * 2 * 4;
  t.num_queries = 2;  // window 4 needs 4
  t.lengths = {10};
  t.keys = {k.data()};
  t.kv_stride = 4;
  CompressConfig c = config(KvPolicy::kSnapKv, 6, 4);
  auto s = compute_layer_scores(c, 0, t);
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.status().message().find("needs the last 4 queries"), std::string::npos);
  t.queries = q.data();
  t.num_queries = 4;
  EXPECT_TRUE(compute_layer_scores(c, 0, t).has_value());
  c.policy = KvPolicy::kCriticalKv;
  s = compute_layer_scores(c, 0, t);
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.status().message().find("o_proj"), std::string::npos);
  // L <= w: nothing scored, fewer queries are fine.
  c.policy = KvPolicy::kSnapKv;
  t.lengths = {3};
  t.num_queries = 3;
  s = compute_layer_scores(c, 0, t);
  ASSERT_TRUE(s.has_value());
  EXPECT_TRUE(s->scores[0].empty());
}

}  // namespace
}  // namespace adakv
