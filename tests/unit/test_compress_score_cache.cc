// KvCompressor with precomputed layer scores (layer_scores + after_prefill_layer(scores), and the
// caller-owned LayerScoreCache): compressing one prefill with many configs through one cache
// gives, config by config, exactly what computing the scores each time gives (plans, rows,
// slots, per-entry metric); score_key groups exactly the configs whose scores are equal.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <string>

#include "compress/kv_compressor.h"
#include "compress/policy.h"
#include "compress_test_model.h"

namespace adakv {
namespace {

using namespace compress_test;

// A pool with the prompt committed and written, as a prefill leaves it before compression.
struct Cache {
  KvCacheManager m;
  CpuKvStorage st;
  SeqId seq;
  explicit Cache(const Model& x) : m(layout(), 64 * kLayers * kKvHeads), st(layout(), 64 * kLayers * kKvHeads) {
    seq = m.add_sequence();
    KvReservation r;
    const KvGrowth g{seq, x.L};
    EXPECT_EQ(m.reserve(std::span<const KvGrowth>(&g, 1), &r), Admission::kOk);
    m.commit(r);
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKvHeads; ++h)
        for (int i = 0; i < x.L; ++i) {
          const KvSlot sl = m.slot(seq, l, h, i);
          std::copy_n(x.key(l, i, h), kDim, st.key(sl));
          std::copy_n(x.value(l, i, h), kDim, st.value(sl));
          st.position(sl) = i;
        }
  }
};

struct Outcome {
  std::vector<LayerPlan> plans;
  std::vector<KvSlot> slots;
  std::vector<int32_t> positions;
  std::vector<float> metric;  // at every remaining entry, row order
  int64_t used_pages = 0;
};

// Prefill hooks for `c` on a fresh copy of the prompt; `cache` null: scores computed each layer.
Outcome compress(const Model& x, const CompressConfig& c, LayerScoreCache* cache) {
  Cache k(x);
  KvCompressor comp(c, layout(), kHeads, k.st.num_slots());
  Outcome out;
  for (int l = 0; l < kLayers; ++l) {
    const int32_t nq = comp.queries_needed(x.L);
    auto plan = cache != nullptr
                    ? comp.after_prefill_layer(k.m, k.st, k.seq, l, x.queries(l, nq), nq, x.o_proj(l), kHidden, *cache)
                    : comp.after_prefill_layer(k.m, k.st, k.seq, l, x.queries(l, nq), nq, x.o_proj(l), kHidden);
    EXPECT_TRUE(plan.has_value()) << plan.status().message();
    if (!plan.has_value()) return out;
    out.plans.push_back(std::move(plan).value());
  }
  k.m.advance_logical_length(k.seq, x.L);
  comp.after_prefill(k.m, k.st, k.seq);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h)
      for (int32_t i = 0; i < k.m.length(k.seq, l, h); ++i) {
        const KvSlot s = k.m.slot(k.seq, l, h, i);
        out.slots.push_back(s);
        out.positions.push_back(k.st.position(s));
        out.metric.push_back(comp.metric(s));
      }
  out.used_pages = k.m.used_pages();
  return out;
}

void expect_same(const Outcome& a, const Outcome& b, const std::string& what) {
  ASSERT_EQ(a.plans.size(), b.plans.size()) << what;
  for (size_t l = 0; l < a.plans.size(); ++l) {
    const LayerPlan& p = a.plans[l];
    const LayerPlan& q = b.plans[l];
    EXPECT_EQ(p.layer, q.layer) << what;
    EXPECT_EQ(p.compressed, q.compressed) << what << " layer " << l;
    EXPECT_EQ(p.selection_budget, q.selection_budget) << what << " layer " << l;
    EXPECT_EQ(p.lengths, q.lengths) << what << " layer " << l;
    EXPECT_EQ(p.counts, q.counts) << what << " layer " << l;
    EXPECT_EQ(p.budgets, q.budgets) << what << " layer " << l;
    EXPECT_EQ(p.keep, q.keep) << what << " layer " << l;
  }
  EXPECT_EQ(a.slots, b.slots) << what;
  EXPECT_EQ(a.positions, b.positions) << what;
  EXPECT_EQ(a.metric, b.metric) << what;  // bit-equal floats: the same scores seeded them
  EXPECT_EQ(a.used_pages, b.used_pages) << what;
}

std::vector<CompressConfig> sweep_configs() {
  std::vector<CompressConfig> out;
  for (KvPolicy p : {KvPolicy::kFull, KvPolicy::kStreamingLlm, KvPolicy::kH2o, KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv,
                     KvPolicy::kPyramidKv, KvPolicy::kAdaPyramidKv, KvPolicy::kCriticalKv, KvPolicy::kAdaCriticalKv,
                     KvPolicy::kKvCompress, KvPolicy::kRandom}) {
    for (int32_t b : {12, 20, 33}) {
      CompressConfig c;
      c.policy = p;
      c.budget = b;
      c.window = 8;
      c.pool_kernel = 3;
      c.sink = 3;
      c.seed = 9;
      out.push_back(c);
    }
  }
  // Knob variants that must not share scores with the above.
  CompressConfig avg;
  avg.policy = KvPolicy::kAdaSnapKv;
  avg.budget = 20;
  avg.window = 8;
  avg.pool = PoolKind::kAvg;
  avg.pool_kernel = 3;
  out.push_back(avg);
  CompressConfig gmax = avg;
  gmax.policy = KvPolicy::kH2o;
  gmax.gqa = GqaReduce::kMax;
  out.push_back(gmax);
  CompressConfig w4 = avg;
  w4.policy = KvPolicy::kCriticalKv;
  w4.pool = PoolKind::kMax;
  w4.window = 4;
  out.push_back(w4);
  CompressConfig seed = avg;
  seed.policy = KvPolicy::kRandom;
  seed.seed = 10;
  out.push_back(seed);
  return out;
}

TEST(KvCompressorScoreCache, CachedScoresGiveIdenticalCompression) {
  const std::vector<CompressConfig> configs = sweep_configs();
  for (int32_t L : {7, 40, 61}) {
    const Model x(L, 300 + L);
    LayerScoreCache cache;  // one prefill: every config of the sweep
    std::set<ScoreKey> keys;
    for (const CompressConfig& c : configs) {
      ASSERT_TRUE(validate_compress_config(c).is_ok()) << kv_policy_name(c.policy);
      const std::string what = std::string(kv_policy_name(c.policy)) + " B=" + std::to_string(c.budget) +
                               " w=" + std::to_string(c.window) + " L=" + std::to_string(L);
      const Outcome ref = compress(x, c, nullptr);
      const Outcome cached = compress(x, c, &cache);
      expect_same(cached, ref, what);
      if (score_key(c).kind != ScoreKind::kNone) keys.insert(score_key(c));
    }
    // Each distinct score key was computed once per layer, everything else was a hit.
    EXPECT_EQ(cache.size(), keys.size() * kLayers) << "L=" << L;
    EXPECT_EQ(cache.misses(), static_cast<int64_t>(keys.size()) * kLayers) << "L=" << L;
    EXPECT_GT(cache.hits(), cache.misses()) << "L=" << L;
  }
}

// layer_scores of one config fed to another with the same score_key: the same as its own scores.
TEST(KvCompressorScoreCache, PrecomputedScoresServeEveryConfigOfTheirKey) {
  const Model x(61, 7);
  CompressConfig snap;
  snap.policy = KvPolicy::kSnapKv;
  snap.budget = 40;
  snap.window = 8;
  CompressConfig crit = snap;
  crit.policy = KvPolicy::kCriticalKv;
  Cache src(x);
  const KvCompressor snap_comp(snap, layout(), kHeads, src.st.num_slots());
  const KvCompressor crit_comp(crit, layout(), kHeads, src.st.num_slots());
  for (KvPolicy p : {KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv, KvPolicy::kPyramidKv, KvPolicy::kAdaPyramidKv,
                     KvPolicy::kCriticalKv, KvPolicy::kAdaCriticalKv}) {
    for (int32_t b : {12, 30}) {
      CompressConfig c = snap;
      c.policy = p;
      c.budget = b;
      const bool two_stage = policy_is_two_stage(p);
      const KvCompressor& scorer = two_stage ? crit_comp : snap_comp;
      const Outcome ref = compress(x, c, nullptr);
      Cache k(x);
      KvCompressor comp(c, layout(), kHeads, k.st.num_slots());
      Outcome got;
      for (int l = 0; l < kLayers; ++l) {
        auto s = scorer.layer_scores(src.m, src.st, src.seq, l, x.queries(l, 8), 8, x.o_proj(l), kHidden);
        ASSERT_TRUE(s.has_value()) << s.status().message();
        auto plan = comp.after_prefill_layer(k.m, k.st, k.seq, l, *s);
        ASSERT_TRUE(plan.has_value()) << plan.status().message();
        got.plans.push_back(std::move(plan).value());
      }
      ASSERT_EQ(got.plans.size(), ref.plans.size());
      for (size_t l = 0; l < ref.plans.size(); ++l) {
        EXPECT_EQ(got.plans[l].keep, ref.plans[l].keep) << kv_policy_name(p) << " " << b << " layer " << l;
        EXPECT_EQ(got.plans[l].budgets, ref.plans[l].budgets) << kv_policy_name(p) << " " << b << " layer " << l;
      }
    }
  }
}

TEST(KvCompressorScoreCache, ScoresThatDoNotFitAreRefused) {
  const Model x(40, 8), y(33, 8);
  CompressConfig snap;
  snap.policy = KvPolicy::kSnapKv;
  snap.budget = 20;
  snap.window = 8;
  CompressConfig crit = snap;
  crit.policy = KvPolicy::kCriticalKv;
  CompressConfig h2o = snap;
  h2o.policy = KvPolicy::kH2o;
  Cache a(x), b(y);
  KvCompressor snap_a(snap, layout(), kHeads, a.st.num_slots());
  KvCompressor snap_b(snap, layout(), kHeads, b.st.num_slots());
  auto other_length = snap_b.layer_scores(b.m, b.st, b.seq, 0, y.queries(0, 8), 8);
  ASSERT_TRUE(other_length.has_value());
  EXPECT_FALSE(snap_a.after_prefill_layer(a.m, a.st, a.seq, 0, *other_length).has_value());
  auto window_only = snap_a.layer_scores(a.m, a.st, a.seq, 0, x.queries(0, 8), 8);
  ASSERT_TRUE(window_only.has_value());
  KvCompressor crit_a(crit, layout(), kHeads, a.st.num_slots());
  EXPECT_FALSE(crit_a.after_prefill_layer(a.m, a.st, a.seq, 0, *window_only).has_value());  // no crit
  KvCompressor h2o_a(h2o, layout(), kHeads, a.st.num_slots());
  EXPECT_FALSE(h2o_a.after_prefill_layer(a.m, a.st, a.seq, 0, *window_only).has_value());  // no metric
  // Nothing was evicted by the refusals.
  for (int h = 0; h < kKvHeads; ++h) EXPECT_EQ(a.m.length(a.seq, 0, h), x.L);
  // The scorer itself refuses too few queries, as after_prefill_layer does.
  EXPECT_FALSE(snap_a.layer_scores(a.m, a.st, a.seq, 0, x.queries(0, 4), 4).has_value());
}

TEST(KvCompressorScoreCache, ScoreKeyGroupsConfigsThatScoreAlike) {
  auto cfg = [](KvPolicy p, int32_t budget) {
    CompressConfig c;
    c.policy = p;
    c.budget = budget;
    return c;
  };
  const ScoreKey snap = score_key(cfg(KvPolicy::kSnapKv, 64));
  EXPECT_EQ(snap.kind, ScoreKind::kWindow);
  for (KvPolicy p : {KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv, KvPolicy::kPyramidKv, KvPolicy::kAdaPyramidKv})
    for (int32_t b : {64, 1024}) {
      CompressConfig c = cfg(p, b);
      c.alpha = 0.5;
      c.beta = 5;
      c.seed = 3;
      c.sink = 1;
      EXPECT_EQ(score_key(c), snap) << kv_policy_name(p) << " " << b;
    }
  const ScoreKey crit = score_key(cfg(KvPolicy::kCriticalKv, 64));
  EXPECT_EQ(crit.kind, ScoreKind::kWindowCritical);
  EXPECT_EQ(score_key(cfg(KvPolicy::kAdaCriticalKv, 512)), crit);
  EXPECT_NE(crit, snap);
  EXPECT_EQ(score_key(cfg(KvPolicy::kFull, 0)).kind, ScoreKind::kNone);
  EXPECT_EQ(score_key(cfg(KvPolicy::kStreamingLlm, 64)), score_key(cfg(KvPolicy::kFull, 0)));

  CompressConfig c = cfg(KvPolicy::kSnapKv, 64);
  c.pool = PoolKind::kAvg;
  EXPECT_NE(score_key(c), snap);
  c = cfg(KvPolicy::kSnapKv, 64);
  c.pool_kernel = 5;
  EXPECT_NE(score_key(c), snap);
  c = cfg(KvPolicy::kSnapKv, 64);
  c.gqa = GqaReduce::kMax;
  EXPECT_NE(score_key(c), snap);
  c = cfg(KvPolicy::kSnapKv, 64);
  c.window = 16;
  EXPECT_NE(score_key(c), snap);

  // H2O reads the GQA reduction and the window, not the pooling.
  CompressConfig h = cfg(KvPolicy::kH2o, 64), h2 = h;
  h2.pool = PoolKind::kAvg;
  h2.pool_kernel = 1;
  h2.budget = 256;
  EXPECT_EQ(score_key(h), score_key(h2));
  h2.gqa = GqaReduce::kMax;
  EXPECT_NE(score_key(h), score_key(h2));
  // KV-Compress reads the pooling and the window, not the GQA reduction or T.
  CompressConfig k = cfg(KvPolicy::kKvCompress, 64), k2 = k;
  k2.gqa = GqaReduce::kMax;
  k2.max_cache_tokens = 100;
  EXPECT_EQ(score_key(k), score_key(k2));
  k2.pool_kernel = 1;
  EXPECT_NE(score_key(k), score_key(k2));
  // Random: the seed.
  CompressConfig r = cfg(KvPolicy::kRandom, 64), r2 = r;
  r2.seed = 1;
  EXPECT_NE(score_key(r), score_key(r2));
  r2 = r;
  r2.budget = 128;
  EXPECT_EQ(score_key(r), score_key(r2));
}

}  // namespace
}  // namespace adakv
