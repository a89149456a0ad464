// KvCompressor with per-sequence configs (the engine serves requests with different policies
// from one pool): sequences of one compressor, each with its own policy, end exactly where a
// dedicated single-config compressor takes the same sequence, through prefill, decode
// observation and continual compression; the shared metric array never mixes sequences.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "compress/kv_compressor.h"

namespace adakv {
namespace {

constexpr int32_t kLayers = 2, kHeads = 4, kKvHeads = 2, kDim = 8, kPage = 4;

KvLayout layout() {
  KvLayout l;
  l.num_layers = kLayers;
  l.num_kv_heads = kKvHeads;
  l.head_dim = kDim;
  l.page_size = kPage;
  return l;
}

CompressConfig config(KvPolicy p) {
  CompressConfig c;
  c.policy = p;
  c.budget = 12;
  c.window = 4;
  c.protected_window = 4;
  c.interval = 3;
  c.sink = 2;
  EXPECT_TRUE(validate_compress_config(c).is_ok());
  return c;
}

// Deterministic random data of one sequence: prompt K/V/queries, then per decode step K/V and
// a query.
struct SeqData {
  int32_t L;
  int32_t decode;
  std::vector<float> k, v;  // [layers][L + decode][Hkv][d]
  std::vector<float> q;     // [layers][L + decode][H][d]
  SeqData(int32_t l, int32_t d, uint32_t seed) : L(l), decode(d) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const size_t n = static_cast<size_t>(L + decode);
    k.resize(kLayers * n * kKvHeads * kDim);
    v.resize(k.size());
    q.resize(kLayers * n * kHeads * kDim);
    for (auto* a : {&k, &v, &q})
      for (float& x : *a) x = nd(rng);
  }
  const float* key(int l, int t, int h) const { return k.data() + ((static_cast<size_t>(l) * (L + decode) + t) * kKvHeads + h) * kDim; }
  const float* value(int l, int t, int h) const { return v.data() + ((static_cast<size_t>(l) * (L + decode) + t) * kKvHeads + h) * kDim; }
  const float* query(int l, int t) const { return q.data() + ((static_cast<size_t>(l) * (L + decode) + t) * kHeads) * kDim; }
};

// Appends tokens [from, to) of `x` to seq (all layers), as a forward would.
void append(KvCacheManager& m, CpuKvStorage& st, SeqId s, const SeqData& x, int from, int to) {
  KvReservation r;
  const KvGrowth g{s, to - from};
  ASSERT_EQ(m.reserve(std::span<const KvGrowth>(&g, 1), &r), Admission::kOk);
  m.commit(r);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h) {
      const int32_t len = m.length(s, l, h);
      for (int t = from; t < to; ++t) {
        const KvSlot sl = m.slot(s, l, h, len - (to - t));
        std::copy_n(x.key(l, t, h), kDim, st.key(sl));
        std::copy_n(x.value(l, t, h), kDim, st.value(sl));
        st.position(sl) = t;
      }
    }
}

// Prefill + decode steps of one sequence through `comp` (prefill of L, then `decode` steps).
void run(KvCompressor& comp, KvCacheManager& m, CpuKvStorage& st, SeqId s, const SeqData& x) {
  append(m, st, s, x, 0, x.L);
  const int32_t nq = comp.queries_needed(s, x.L);
  for (int l = 0; l < kLayers; ++l) {
    auto plan = comp.after_prefill_layer(m, st, s, l, x.query(l, x.L - nq), nq);
    ASSERT_TRUE(plan.has_value()) << plan.status().message();
  }
  m.advance_logical_length(s, x.L);
  comp.after_prefill(m, st, s);
  for (int t = x.L; t < x.L + x.decode; ++t) {
    append(m, st, s, x, t, t + 1);
    comp.on_append(m, s, 1);
    for (int l = 0; l < kLayers; ++l) comp.observe_decode(m, st, s, l, x.query(l, t));
    m.advance_logical_length(s, 1);
    comp.after_decode_step(m, st, s);
  }
}

struct RowImage {
  std::vector<int32_t> positions;
  std::vector<float> metric;
  bool operator==(const RowImage&) const = default;
};
std::vector<RowImage> image(const KvCompressor& comp, const KvCacheManager& m, const CpuKvStorage& st, SeqId s) {
  std::vector<RowImage> out;
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h) {
      RowImage r;
      // The metric is defined only for the policies that keep one (a slot's value is stale
      // otherwise: slots are reused across sequences).
      const KvPolicy p = comp.config(s).policy;
      const bool metric = p == KvPolicy::kH2o || p == KvPolicy::kKvCompress;
      for (int32_t i = 0; i < m.length(s, l, h); ++i) {
        r.positions.push_back(st.position(m.slot(s, l, h, i)));
        if (metric) r.metric.push_back(comp.metric(m.slot(s, l, h, i)));
      }
      out.push_back(r);
    }
  return out;
}

TEST(KvCompressorPerSequence, EachSequenceEqualsADedicatedCompressor) {
  const std::vector<KvPolicy> policies = {KvPolicy::kSnapKv,   KvPolicy::kH2o,        KvPolicy::kKvCompress,
                                          KvPolicy::kFull,     KvPolicy::kStreamingLlm, KvPolicy::kAdaPyramidKv};
  // One pool, one compressor whose default is full; sequences interleaved step by step would
  // need a forward, so they run one after the other, all alive together in one pool.
  KvCacheManager shared_m(layout(), 600);
  CpuKvStorage shared_st(layout(), 600);
  KvCompressor shared(CompressConfig{}, layout(), kHeads, shared_st.num_slots());
  std::vector<SeqId> seqs;
  std::vector<SeqData> data;
  for (size_t i = 0; i < policies.size(); ++i) data.emplace_back(30 + 5 * static_cast<int32_t>(i), 7, 40 + i);
  for (size_t i = 0; i < policies.size(); ++i) {
    seqs.push_back(shared_m.add_sequence());
    if (policies[i] != KvPolicy::kFull) shared.set_config(seqs.back(), config(policies[i]));
    EXPECT_EQ(shared.config(seqs.back()).policy, policies[i]);
  }
  for (size_t i = 0; i < policies.size(); ++i) run(shared, shared_m, shared_st, seqs[i], data[i]);
  EXPECT_EQ(shared_m.check_consistency(), "");

  int compressed = 0;
  for (size_t i = 0; i < policies.size(); ++i) {
    SCOPED_TRACE(kv_policy_name(policies[i]));
    KvCacheManager m(layout(), 600);
    CpuKvStorage st(layout(), 600);
    KvCompressor own(config(policies[i]), layout(), kHeads, st.num_slots());
    const SeqId s = m.add_sequence();
    run(own, m, st, s, data[i]);
    const auto want = image(own, m, st, s);
    EXPECT_EQ(image(shared, shared_m, shared_st, seqs[i]), want);
    int64_t entries = 0;
    for (const RowImage& r : want) entries += static_cast<int64_t>(r.positions.size());
    if (entries < int64_t{kLayers} * kKvHeads * (data[i].L + data[i].decode)) ++compressed;
  }
  EXPECT_EQ(compressed, 5);  // every policy but full evicted something

  // Releasing a sequence forgets its config: the id falls back to the default.
  shared.on_release(seqs[1]);
  shared_m.release(seqs[1]);
  EXPECT_EQ(shared.config(seqs[1]).policy, KvPolicy::kFull);
  EXPECT_EQ(shared.queries_needed(seqs[0], 100), 4);
  EXPECT_EQ(shared.queries_needed(100), 0);
}

}  // namespace
}  // namespace adakv
