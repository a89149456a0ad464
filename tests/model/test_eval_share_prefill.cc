// The shared prefill of `adakv eval` (engine/prefill_snapshot.h + continue_generation) against
// the independent path (generate() per config), on the shipped adakv-tiny-v1 with a ~1.2K-token
// needle prompt: for every policy, two budgets and both protocols, the same generated tokens,
// the same cache statistics, and the same cache, row for row and entry for entry (lengths,
// slots, positions, key and value bits), after the prefill and at the end of decoding (the shared
// path with one layer-score cache per snapshot, as EvalRunner replays it). Then the
// EvalRunner with share_prefill on and off gives the same rows.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/eval_runner.h"
#include "engine/generator.h"
#include "engine/prefill_snapshot.h"
#include "eval/haystack.h"
#include "eval/tasks.h"
#include "tiny_eval_fixture.h"

namespace adakv {
namespace {

eval::Sample needle(int length, double depth, uint64_t seed) {
  eval::TaskOptions o;
  o.target_tokens = length;
  o.depth = depth;
  auto s = eval::make_task_sample(*tiny_eval_fixture().haystack, eval::Task::kNiah, o, seed, 0);
  EXPECT_TRUE(s.has_value()) << s.status().message();
  return std::move(s).value();
}

// A cache as seen through kv_tap, entry by entry.
struct CacheImage {
  int64_t logical = 0;
  int64_t free_pages = 0;
  std::vector<int32_t> lengths;    // [layers * kv heads]
  std::vector<KvSlot> slots;       // every entry of every row, in row order
  std::vector<int32_t> positions;  // same order
  std::vector<float> keys, values; // same order, [head_dim] each
};

CacheImage image_of(const KvCacheManager& m, const CpuKvStorage& st, SeqId seq) {
  CacheImage c;
  c.logical = m.logical_length(seq);
  c.free_pages = m.free_pages();
  const KvLayout& L = m.layout();
  for (int32_t l = 0; l < L.num_layers; ++l)
    for (int32_t h = 0; h < L.num_kv_heads; ++h) {
      const int32_t n = m.length(seq, l, h);
      c.lengths.push_back(n);
      for (int32_t i = 0; i < n; ++i) {
        const KvSlot s = m.slot(seq, l, h, i);
        c.slots.push_back(s);
        c.positions.push_back(st.position(s));
        c.keys.insert(c.keys.end(), st.key(s), st.key(s) + st.head_dim());
        c.values.insert(c.values.end(), st.value(s), st.value(s) + st.head_dim());
      }
    }
  return c;
}

void expect_same_cache(const CacheImage& a, const CacheImage& b, const std::string& what) {
  EXPECT_EQ(a.logical, b.logical) << what;
  EXPECT_EQ(a.free_pages, b.free_pages) << what;
  EXPECT_EQ(a.lengths, b.lengths) << what;
  EXPECT_EQ(a.slots, b.slots) << what;
  EXPECT_EQ(a.positions, b.positions) << what;
  ASSERT_EQ(a.keys.size(), b.keys.size()) << what;
  ASSERT_EQ(a.values.size(), b.values.size()) << what;
  EXPECT_EQ(std::memcmp(a.keys.data(), b.keys.data(), a.keys.size() * sizeof(float)), 0) << what << ": keys differ";
  EXPECT_EQ(std::memcmp(a.values.data(), b.values.data(), a.values.size() * sizeof(float)), 0)
      << what << ": values differ";
}

struct TappedRun {
  GenerateResult result;
  CacheImage after_prefill, end;
};

TEST(SharedPrefill, EveryPolicyMatchesIndependentGenerate) {
  TinyEvalFixture& f = tiny_eval_fixture();
  const Transformer& model = *f.model;
  const EvalRunner runner(model, f.tokenizer);
  const eval::Sample sample = needle(1280, 0.4, 11);
  const eval::PromptTokens tokens = eval::tokenize_prompt(sample, runner.tokenize_fn());
  const std::span<const int32_t> all(tokens.ids);
  ASSERT_GT(tokens.ids.size(), 1000u);
  ASSERT_GT(tokens.question_start, 0u);
  ASSERT_LT(tokens.question_start, tokens.ids.size());

  // 40 tokens regardless of EOS, so the continual policies (interval 16) compress while decoding.
  GenerateOptions base;
  base.max_new_tokens = 40;
  base.ignore_eos = true;
  base.sampling.temperature = 0.0f;

  std::vector<CompressConfig> configs;
  {
    CompressConfig full;
    configs.push_back(full);
  }
  for (KvPolicy p : {KvPolicy::kStreamingLlm, KvPolicy::kH2o, KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv,
                     KvPolicy::kPyramidKv, KvPolicy::kAdaPyramidKv, KvPolicy::kCriticalKv, KvPolicy::kAdaCriticalKv,
                     KvPolicy::kKvCompress, KvPolicy::kRandom}) {
    for (int32_t b : {64, 256}) {
      CompressConfig c;
      c.policy = p;
      c.budget = b;
      if (p == KvPolicy::kRandom) c.seed = 5;
      configs.push_back(c);
    }
  }
  std::vector<const CompressConfig*> ptrs;
  for (const CompressConfig& c : configs) ptrs.push_back(&c);

  auto o_proj_or = load_o_proj(model.dir(), model.config());
  ASSERT_TRUE(o_proj_or.has_value()) << o_proj_or.status().message();
  const std::vector<std::vector<float>> o_proj = std::move(o_proj_or).value();

  for (EvalProtocol protocol : {EvalProtocol::kInside, EvalProtocol::kAfter}) {
    const bool after = protocol == EvalProtocol::kAfter;
    const std::span<const int32_t> prefill = after ? all.first(tokens.question_start) : all;
    const std::span<const int32_t> append = after ? all.subspan(tokens.question_start) : std::span<const int32_t>();
    const int32_t nq = max_queries_needed(model, ptrs, static_cast<int32_t>(prefill.size()));
    EXPECT_EQ(nq, static_cast<int32_t>(prefill.size()));  // H2O wants every query
    auto snap = capture_prefill(model, prefill, static_cast<int64_t>(all.size()) + base.max_new_tokens,
                                base.page_size, nq);
    ASSERT_TRUE(snap.has_value()) << snap.status().message();
    // As EvalRunner does: one score cache per snapshot, shared by every config (two budgets per
    // policy, and the policies that score alike), so the comparison covers the cached scores.
    LayerScoreCache score_cache;

    for (const CompressConfig& config : configs) {
      const std::string what = std::string(kv_policy_name(config.policy)) + " " + std::to_string(config.budget) + " " +
                               eval_protocol_name(protocol);
      auto tapped = [](TappedRun& r) {
        return [&r](KvTapPoint at, const KvCacheManager& m, const CpuKvStorage& st, SeqId seq) {
          (at == KvTapPoint::kAfterPrefill ? r.after_prefill : r.end) = image_of(m, st, seq);
        };
      };
      // The reference: generate() from scratch.
      TappedRun ref;
      {
        GenerateOptions o = base;
        o.compress = &config;
        o.kv_tap = tapped(ref);
        std::span<const int32_t> prompt = all;
        if (after) {
          o.context = prefill;
          prompt = append;
        }
        auto r = generate(model, prompt, o, {});
        ASSERT_TRUE(r.has_value()) << what << ": " << r.status().message();
        ref.result = std::move(r).value();
      }
      // The shared prefill.
      TappedRun shared;
      {
        auto cache = replay_prefill(model, *snap, &config, &o_proj, &score_cache);
        ASSERT_TRUE(cache.has_value()) << what << ": " << cache.status().message();
        PrefilledSequence seq;
        seq.manager = &(*cache)->manager;
        seq.storage = &(*cache)->storage;
        seq.seq = (*cache)->seq;
        seq.compressor = (*cache)->compressor.get();
        seq.logits = snap->logits;
        GenerateOptions o = base;
        o.kv_tap = tapped(shared);
        auto r = continue_generation(model, seq, append, o, {});
        ASSERT_TRUE(r.has_value()) << what << ": " << r.status().message();
        shared.result = std::move(r).value();
      }
      EXPECT_EQ(shared.result.tokens, ref.result.tokens) << what;
      ASSERT_EQ(ref.result.tokens.size(), 40u) << what;
      const KvCacheStats& a = shared.result.stats.kv_after_prefill;
      const KvCacheStats& b = ref.result.stats.kv_after_prefill;
      EXPECT_EQ(a.entries, b.entries) << what;
      EXPECT_EQ(a.full_entries, b.full_entries) << what;
      EXPECT_EQ(a.pages_used, b.pages_used) << what;
      EXPECT_EQ(shared.result.stats.kv.entries, ref.result.stats.kv.entries) << what;
      EXPECT_EQ(shared.result.stats.kv.pages_used, ref.result.stats.kv.pages_used) << what;
      EXPECT_EQ(shared.result.stats.decode_steps, ref.result.stats.decode_steps) << what;
      expect_same_cache(shared.after_prefill, ref.after_prefill, what + " after prefill");
      expect_same_cache(shared.end, ref.end, what + " at the end");
      if (config.policy != KvPolicy::kFull) {
        // The budgets really bit (every budget here is far below the ~1.2K-token prompt).
        EXPECT_LT(b.entries, b.full_entries / 2) << what;
      }
    }
    // Computed once per (layer, score kind): h2o, window, window + crit, kvcompress, random.
    EXPECT_EQ(score_cache.size(), 5u * static_cast<size_t>(model.config().num_layers));
    EXPECT_GT(score_cache.hits(), score_cache.misses());
  }
}

TEST(SharedPrefill, EvalRunnerRowsEqualWithAndWithoutSharing) {
  TinyEvalFixture& f = tiny_eval_fixture();
  EvalRunOptions on, off;
  on.share_prefill = true;
  off.share_prefill = false;
  const EvalRunner shared(*f.model, f.tokenizer, on);
  const EvalRunner independent(*f.model, f.tokenizer, off);
  EvalItem item{needle(640, 0.6, 3), 640, 0.6, 0};
  std::vector<EvalConfig> configs;
  configs.push_back({"full", 0, CompressConfig{}});
  for (KvPolicy p : {KvPolicy::kStreamingLlm, KvPolicy::kH2o, KvPolicy::kAdaSnapKv, KvPolicy::kAdaCriticalKv,
                     KvPolicy::kKvCompress}) {
    CompressConfig c;
    c.policy = p;
    c.budget = 96;
    configs.push_back({kv_policy_name(p), 96, c});
  }
  const std::vector<EvalProtocol> protocols = {EvalProtocol::kInside, EvalProtocol::kAfter};
  int ticks = 0;
  auto a = shared.run(item, configs, protocols, [&] { ++ticks; });
  ASSERT_TRUE(a.has_value()) << a.status().message();
  EXPECT_EQ(ticks, static_cast<int>(configs.size() * protocols.size()));
  auto b = independent.run(item, configs, protocols);
  ASSERT_TRUE(b.has_value()) << b.status().message();
  ASSERT_EQ(a->size(), b->size());
  for (size_t i = 0; i < a->size(); ++i) {
    const EvalRow& x = (*a)[i];
    const EvalRow& y = (*b)[i];
    const std::string what = x.policy + " " + eval_protocol_name(x.protocol);
    EXPECT_EQ(x.policy, y.policy);
    EXPECT_EQ(x.budget, y.budget);
    EXPECT_EQ(x.protocol, y.protocol);
    EXPECT_EQ(x.prompt_tokens, y.prompt_tokens) << what;
    EXPECT_EQ(x.question_tokens, y.question_tokens) << what;
    EXPECT_EQ(x.kept_fraction, y.kept_fraction) << what;
    EXPECT_EQ(x.prediction, y.prediction) << what;
    EXPECT_EQ(x.score, y.score) << what;
    EXPECT_GE(x.seconds, 0.0) << what;
    // Everything but the timing column.
    EvalRow xs = x, ys = y;
    xs.seconds = ys.seconds = 0.0;
    EXPECT_EQ(eval_csv_row(xs), eval_csv_row(ys)) << what;
  }
}

TEST(SharedPrefill, TooLongPromptFailsLikeGenerate) {
  TinyEvalFixture& f = tiny_eval_fixture();
  EvalRunOptions on, off;
  off.share_prefill = false;
  const EvalRunner shared(*f.model, f.tokenizer, on);
  const EvalRunner independent(*f.model, f.tokenizer, off);
  EvalItem item{needle(256, 0.5, 1), 256, 0.5, 0};
  item.sample.max_new_tokens = static_cast<int>(f.model->context_length());  // cannot fit
  const std::vector<EvalConfig> configs = {{"full", 0, CompressConfig{}}};
  auto a = shared.run(item, configs, {EvalProtocol::kInside});
  auto b = independent.run(item, configs, {EvalProtocol::kInside});
  ASSERT_FALSE(a.has_value());
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(a.status().message(), b.status().message());
}

// The CLI's --no-share-prefill: the same CSV as the default, but for the seconds column.
TEST(SharedPrefill, CliNoSharePrefillWritesTheSameCsv) {
  namespace fs = std::filesystem;
  const fs::path base = fs::temp_directory_path() / ("adakv_share_" + std::to_string(::getpid()));
  auto run = [&](const std::string& tag, const std::string& flag) {
    const std::string prefix = base.string() + tag;
    const std::string cmd = std::string("'") + ADAKV_BINARY_PATH + "' eval needle --model '" + kTinyModelDir +
                            "' --haystack '" + kHaystackFile +
                            "' --policies full,h2o,ada-criticalkv,kvcompress --budgets 64 --protocol both "
                            "--lengths 320 --depths 0.5 --samples 1 --out '" + prefix + "' " + flag +
                            " >/dev/null 2>&1";
    const int status = std::system(cmd.c_str());
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << cmd;
    std::ifstream f(prefix + ".csv");
    std::vector<std::string> lines;
    for (std::string line; std::getline(f, line);) {
      // Drop the seconds column (13th): predictions here are digits, no quoted commas.
      std::vector<std::string> cols;
      std::stringstream ss(line);
      for (std::string c; std::getline(ss, c, ',');) cols.push_back(c);
      if (cols.size() > 12) cols.erase(cols.begin() + 12);
      std::string joined;
      for (const std::string& c : cols) joined += c + ",";
      lines.push_back(joined);
    }
    fs::remove(prefix + ".csv");
    fs::remove(prefix + ".json");
    return lines;
  };
  const std::vector<std::string> shared = run("_on", "");
  const std::vector<std::string> independent = run("_off", "--no-share-prefill");
  EXPECT_EQ(shared.size(), 1u + 4u * 2u);
  EXPECT_EQ(shared, independent);
}

}  // namespace
}  // namespace adakv
