// Compression wired into the CPU engine, end to end on the tiny fixture checkpoints: the
// CompressionObserver driving KvCompressor from inside the forward, the generator's
// question-agnostic append, and the `adakv generate / inspect` flags.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "compress/kv_compressor.h"
#include "engine/compression_observer.h"
#include "engine/generator.h"
#include "model/transformer.h"

namespace adakv {
namespace {

namespace fs = std::filesystem;
const fs::path kModelsDir = fs::path(ADAKV_FIXTURES_DIR) / "models";
constexpr int32_t kPage = 4;

// A deterministic token sequence inside the vocabulary (the ids need not be text).
std::vector<int32_t> tokens_for(const Transformer& m, int64_t n, uint32_t seed) {
  std::vector<int32_t> t;
  uint32_t x = seed * 2654435761u + 12345u;
  for (int64_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    t.push_back(static_cast<int32_t>((x >> 8) % static_cast<uint32_t>(m.config().vocab_size)));
  }
  return t;
}

// Records the positions of every step's queries (layer 0) as the forward reports them.
struct PositionTap : LayerObserver {
  std::vector<std::vector<int32_t>> steps;  // [steps][n]
  void on_layer_queries(const LayerQueries& q) override {
    if (q.layer == 0) steps.emplace_back(q.positions.begin(), q.positions.end());
  }
};

// One sequence's cache plus, unless the policy is full, the compressor driving it.
struct SeqRun {
  SeqRun(const Transformer& model, const CompressConfig& c, int64_t tokens)
      : layout(model.kv_layout(kPage)),
        num_pages((tokens + kPage - 1) / kPage * layout.num_layers * layout.num_kv_heads),
        manager(layout, num_pages),
        storage(layout, num_pages),
        seq(manager.add_sequence()),
        compressor(c, layout, static_cast<int32_t>(model.config().num_heads), storage.num_slots()) {
    if (policy_is_two_stage(c.policy)) o_proj = load_o_proj(model.dir(), model.config()).value();
    observer = std::make_unique<CompressionObserver>(compressor, model.config(), manager, storage, seq, &o_proj, &tap);
  }
  // Runs one step; returns its logits (all rows with all_logits).
  std::vector<float> step(const Transformer& model, std::span<const int32_t> toks, CompressionObserver::Phase phase,
                          bool all_logits = false) {
    observer->begin_step(phase, static_cast<int64_t>(toks.size()));
    ForwardOptions fwd;
    fwd.observer = observer.get();
    fwd.all_logits = all_logits;
    std::vector<float> logits;
    const Status s = model.forward(toks, KvContext{&manager, &storage, seq}, fwd, &logits);
    EXPECT_TRUE(s.is_ok()) << s.message();
    const Status e = observer->end_step();
    EXPECT_TRUE(e.is_ok()) << e.message();
    return logits;
  }
  int32_t length(int32_t l, int32_t h) const { return manager.length(seq, l, h); }

  KvLayout layout;
  int64_t num_pages;
  KvCacheManager manager;
  CpuKvStorage storage;
  SeqId seq;
  KvCompressor compressor;
  std::vector<std::vector<float>> o_proj;
  PositionTap tap;
  std::unique_ptr<CompressionObserver> observer;
};

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0.0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) d = std::max(d, std::fabs(static_cast<double>(a[i]) - b[i]));
  return d;
}

class CompressionE2e : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kModelsDir / "llama3" / "config.json")) GTEST_SKIP() << "llama3 fixture not generated";
    auto loaded = Transformer::load((kModelsDir / "llama3").string());
    ASSERT_TRUE(loaded.has_value()) << loaded.status().message();
    model_ = std::move(loaded).value();
  }
  std::unique_ptr<Transformer> model_;
};

const KvPolicy kAllPolicies[] = {KvPolicy::kStreamingLlm, KvPolicy::kH2o,         KvPolicy::kSnapKv,
                                 KvPolicy::kPyramidKv,    KvPolicy::kAdaSnapKv,   KvPolicy::kAdaPyramidKv,
                                 KvPolicy::kCriticalKv,   KvPolicy::kAdaCriticalKv, KvPolicy::kKvCompress,
                                 KvPolicy::kRandom};

TEST_F(CompressionE2e, BudgetAtOrAboveThePromptKeepsTheFullCachesLogits) {
  const int64_t n = 40, decode = 5;
  const std::vector<int32_t> toks = tokens_for(*model_, n + decode, 1);
  auto trace = [&](const CompressConfig& c) {
    SeqRun r(*model_, c, n + decode);
    std::vector<std::vector<float>> out;  // [1 + decode][vocab]
    out.push_back(r.step(*model_, std::span<const int32_t>(toks.data(), n), CompressionObserver::Phase::kPrefill));
    for (int64_t i = 0; i < decode; ++i)
      out.push_back(r.step(*model_, std::span<const int32_t>(toks.data() + n + i, 1), CompressionObserver::Phase::kDecode));
    return out;
  };
  const auto full = trace(CompressConfig{});
  for (KvPolicy p : kAllPolicies) {
    CompressConfig c;
    c.policy = p;
    c.window = 8;
    c.interval = 1;  // continual policies run at every decode step
    // Window policies compress the prompt only; continual ones also see the decoded tokens.
    c.budget = static_cast<int32_t>(policy_is_continual(p) ? n + decode : n);
    ASSERT_TRUE(validate_compress_config(c).is_ok()) << kv_policy_name(p);
    const auto got = trace(c);
    for (size_t s = 0; s < full.size(); ++s)
      EXPECT_LE(max_abs_diff(got[s], full[s]), 1e-6) << kv_policy_name(p) << " step " << s;
  }
}

TEST_F(CompressionE2e, SmallBudgetShrinksRowsKeepsTheWindowAndContinuesPositions) {
  const int32_t n = 60;
  const std::vector<int32_t> toks = tokens_for(*model_, n + 2, 2);
  for (KvPolicy p : {KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv, KvPolicy::kPyramidKv, KvPolicy::kAdaCriticalKv}) {
    CompressConfig c;
    c.policy = p;
    c.window = 8;
    c.budget = 20;
    SeqRun r(*model_, c, n + 2);
    r.step(*model_, std::span<const int32_t>(toks.data(), n), CompressionObserver::Phase::kPrefill);
    const KvLayout& L = r.layout;
    int64_t pages = 0, entries = 0;
    for (int32_t l = 0; l < L.num_layers; ++l) {
      int64_t layer_entries = 0;
      for (int32_t h = 0; h < L.num_kv_heads; ++h) {
        const int32_t len = r.length(l, h);
        pages += (len + kPage - 1) / kPage;
        layer_entries += len;
        ASSERT_GE(len, c.window) << kv_policy_name(p);
        // The window: the last w entries are the last w prompt positions, in order.
        for (int32_t i = 0; i < c.window; ++i)
          EXPECT_EQ(r.storage.position(r.manager.slot(r.seq, l, h, len - c.window + i)), n - c.window + i)
              << kv_policy_name(p) << " layer " << l << " head " << h;
        // Kept positions ascend (entry order is token order after a keep).
        for (int32_t i = 1; i < len; ++i)
          EXPECT_LT(r.storage.position(r.manager.slot(r.seq, l, h, i - 1)), r.storage.position(r.manager.slot(r.seq, l, h, i)));
        if (!policy_is_adaptive(p) && !policy_uses_pyramid(p)) {
          EXPECT_EQ(len, c.budget) << kv_policy_name(p);
        }
      }
      // Uniform and Ada allocation both spend exactly B per head of the layer on average.
      if (!policy_uses_pyramid(p)) {
        EXPECT_EQ(layer_entries, int64_t{c.budget} * L.num_kv_heads) << kv_policy_name(p);
      }
      entries += layer_entries;
    }
    EXPECT_EQ(r.manager.used_pages(), pages) << kv_policy_name(p);
    EXPECT_LT(pages, int64_t{L.num_layers} * L.num_kv_heads * ((n + kPage - 1) / kPage)) << kv_policy_name(p);
    EXPECT_LT(entries, int64_t{n} * L.num_layers * L.num_kv_heads);
    EXPECT_EQ(r.manager.logical_length(r.seq), n);

    // The first decoded token gets RoPE position n (the logical length), not a row's length.
    r.step(*model_, std::span<const int32_t>(toks.data() + n, 1), CompressionObserver::Phase::kDecode);
    ASSERT_EQ(r.tap.steps.size(), 2u);
    ASSERT_EQ(r.tap.steps[1].size(), 1u);
    EXPECT_EQ(r.tap.steps[1][0], n) << kv_policy_name(p);
    const int32_t len0 = r.length(0, 0);
    EXPECT_EQ(r.storage.position(r.manager.slot(r.seq, 0, 0, len0 - 1)), n);
    EXPECT_EQ(r.manager.logical_length(r.seq), n + 1);
    EXPECT_EQ(r.manager.check_consistency(), "");
  }
}

TEST_F(CompressionE2e, AppendedQuestionOverTheFullContextEqualsOnePrefill) {
  const int64_t nc = 45, nq = 11;
  const std::vector<int32_t> toks = tokens_for(*model_, nc + nq, 3);
  SeqRun one(*model_, CompressConfig{}, nc + nq);
  const std::vector<float> ref = one.step(*model_, toks, CompressionObserver::Phase::kPrefill, /*all_logits=*/true);
  SeqRun two(*model_, CompressConfig{}, nc + nq);
  two.step(*model_, std::span<const int32_t>(toks.data(), nc), CompressionObserver::Phase::kPrefill);
  const std::vector<float> got = two.step(*model_, std::span<const int32_t>(toks.data() + nc, nq),
                                          CompressionObserver::Phase::kPrefill, /*all_logits=*/true);
  const size_t vocab = static_cast<size_t>(model_->config().vocab_size);
  ASSERT_EQ(got.size(), nq * vocab);
  const std::vector<float> tail(ref.end() - static_cast<ptrdiff_t>(nq * vocab), ref.end());
  double scale = 0.0;
  for (float v : tail) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  EXPECT_LE(max_abs_diff(got, tail), 1e-5 * std::max(1.0, scale));
}

TEST_F(CompressionE2e, QuestionAfterACompressedContextIsNotCompressedAgain) {
  const int64_t nc = 60, nq = 12;
  const std::vector<int32_t> toks = tokens_for(*model_, nc + nq, 4);
  CompressConfig c;
  c.policy = KvPolicy::kAdaSnapKv;
  c.window = 8;
  c.budget = 20;
  SeqRun r(*model_, c, nc + nq);
  r.step(*model_, std::span<const int32_t>(toks.data(), nc), CompressionObserver::Phase::kPrefill);
  std::vector<int32_t> before;  // [layers * kv_heads]
  for (int32_t l = 0; l < r.layout.num_layers; ++l)
    for (int32_t h = 0; h < r.layout.num_kv_heads; ++h) before.push_back(r.length(l, h));
  // A second kPrefill is an append: every row grows by the question, nothing is evicted.
  r.step(*model_, std::span<const int32_t>(toks.data() + nc, nq), CompressionObserver::Phase::kPrefill);
  size_t i = 0;
  for (int32_t l = 0; l < r.layout.num_layers; ++l)
    for (int32_t h = 0; h < r.layout.num_kv_heads; ++h) {
      EXPECT_EQ(r.length(l, h), before[i++] + nq);
      EXPECT_EQ(r.storage.position(r.manager.slot(r.seq, l, h, r.length(l, h) - 1)), nc + nq - 1);
    }
  ASSERT_EQ(r.tap.steps.size(), 2u);
  EXPECT_EQ(r.tap.steps[1].front(), nc);  // question positions continue from the context

  // The generator's --context path does the same and reports it.
  GenerateOptions opts;
  opts.max_new_tokens = 3;
  opts.ignore_eos = true;
  opts.page_size = kPage;
  opts.compress = &c;
  opts.context = std::span<const int32_t>(toks.data(), nc);
  auto res = generate(*model_, std::span<const int32_t>(toks.data() + nc, nq), opts, {});
  ASSERT_TRUE(res.has_value()) << res.status().message();
  const KvCacheStats& k = res.value().stats.kv_after_prefill;
  EXPECT_EQ(k.full_entries, (nc + nq) * r.layout.num_layers * r.layout.num_kv_heads);
  EXPECT_EQ(k.entries, int64_t{c.budget + nq} * r.layout.num_layers * r.layout.num_kv_heads);
  EXPECT_EQ(res.value().tokens.size(), 3u);
}

// --- the CLI -------------------------------------------------------------------------------

struct CliResult {
  int exit_code = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

CliResult run_cli(const std::string& args) {
  const fs::path base = fs::temp_directory_path() / ("adakv_e2e_" + std::to_string(::getpid()));
  const std::string out = base.string() + ".out", err = base.string() + ".err";
  const int status = std::system((std::string(ADAKV_BINARY_PATH) + " " + args + " >" + out + " 2>" + err).c_str());
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  fs::remove(out);
  fs::remove(err);
  return r;
}

const std::string kText =
    "'the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat and the bird sings "
    "a song about rivers mountains and the sea and then the fox runs back into the forest to find food'";

TEST(CompressionCli, OutOfRangeValuesAreRefusedWithTheAllowedRange) {
  const std::string model = (kModelsDir / "llama3").string();
  if (!fs::exists(model + "/config.json")) GTEST_SKIP() << "llama3 fixture not generated";
  const struct {
    std::string flags, needle;
  } cases[] = {
      {"--kv-policy snapkv --kv-budget 16", "--kv-budget 16 is out of range: allowed (kv-window"},
      {"--kv-policy snapkv --kv-budget 64 --kv-pool-kernel 4", "kv-pool-kernel"},
      {"--kv-policy snapkv --kv-budget 64 --kv-alpha 1.5", "allowed [0, 1]"},
      {"--kv-policy ada-snapkv --kv-budget 64 --kv-window 0", "kv-window"},
      {"--kv-policy streamingllm --kv-budget 8 --kv-sink 8", "kv-sink"},
      {"--kv-policy kvcompress --kv-interval 0", "kv-interval"},
      {"--kv-policy nosuch --kv-budget 64", "nosuch"},
      {"--kv-policy snapkv --kv-budget 64 --kv-gqa sum", "allowed mean | max"},
  };
  for (const auto& c : cases) {
    const CliResult r = run_cli("generate --model " + model + " --prompt hello -n 2 " + c.flags);
    EXPECT_EQ(r.exit_code, 1) << c.flags;
    EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.flags << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("adakv: error: ", 0), 0u) << r.err;
  }
}

TEST(CompressionCli, GenerateReportsKvStats) {
  const std::string model = (kModelsDir / "llama3").string();
  if (!fs::exists(model + "/config.json")) GTEST_SKIP() << "llama3 fixture not generated";
  const CliResult r = run_cli("generate --model " + model + " --prompt " + kText +
                              " -n 4 --ignore-eos --kv-policy snapkv --kv-budget 12 --kv-window 4");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("kv policy: snapkv"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("adakv: kv after prefill: 48 / "), std::string::npos) << r.err;  // 12 x 2 layers x 2 heads
}

TEST(CompressionCli, InspectJsonHasThePlanOfEveryLayerAndHead) {
  const std::string model = (kModelsDir / "llama3").string();
  if (!fs::exists(model + "/config.json")) GTEST_SKIP() << "llama3 fixture not generated";
  const fs::path json_path = fs::temp_directory_path() / ("adakv_inspect_" + std::to_string(::getpid()) + ".json");
  for (const std::string policy : {"snapkv", "ada-snapkv", "pyramidkv"}) {
    const int budget = 12, window = 4;
    const CliResult r = run_cli("inspect --model " + model + " --prompt " + kText + " --kv-policy " + policy +
                                " --kv-budget " + std::to_string(budget) + " --kv-window " + std::to_string(window) +
                                " --json " + json_path.string());
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const nlohmann::json j = nlohmann::json::parse(slurp(json_path));
    const int n = j.at("prompt_tokens");
    ASSERT_GT(n, 2 * budget) << "prompt too short for the test";
    ASSERT_EQ(j.at("num_layers"), 2);
    ASSERT_EQ(j.at("num_kv_heads"), 2);
    ASSERT_EQ(j.at("layers").size(), 2u);
    int64_t total = 0;
    for (const auto& jl : j.at("layers")) {
      ASSERT_EQ(jl.at("heads").size(), 2u);
      EXPECT_TRUE(jl.at("compressed").get<bool>());
      const int bs = jl.at("selection_budget");
      int layer_kept = 0;
      for (const auto& jh : jl.at("heads")) {
        const int kept = jh.at("kept");
        const std::vector<int> pos = jh.at("positions");
        ASSERT_EQ(static_cast<int>(pos.size()), kept);
        EXPECT_EQ(jh.at("length_before").get<int>(), n);
        // Selected candidates plus the window; the window is the last w positions.
        EXPECT_EQ(kept, jh.at("budget").get<int>() + window) << policy;
        for (int i = 0; i < window; ++i) EXPECT_EQ(pos[kept - window + i], n - window + i);
        EXPECT_TRUE(std::is_sorted(pos.begin(), pos.end()));
        EXPECT_EQ(jh.at("ada_count").is_null(), policy != "ada-snapkv");
        layer_kept += kept;
      }
      // Heads of a layer spend Bs_l + w each on average (uniform: each; Ada: in sum).
      EXPECT_EQ(layer_kept, 2 * (bs + window)) << policy;
      if (policy != "pyramidkv") {
        EXPECT_EQ(bs, budget - window) << policy;
      }
      total += layer_kept;
    }
    EXPECT_EQ(j.at("entries_kept").get<int64_t>(), total);
    EXPECT_EQ(j.at("entries_full").get<int64_t>(), int64_t{n} * 4);
  }
  fs::remove(json_path);
}

// The engine's keep sets, through the forward pass and `adakv inspect`, equal the numpy
// reference's (tools/reference/compress_ref.py) on the same prompt's Q/K/V, dumped with
// `adakv inspect --dump-qk` and turned into tests/fixtures/compress/model_llama3.json by
// tools/reference/gen_model_fixtures.py.
TEST(CompressionCli, InspectKeepSetsEqualTheNumpyReferenceOnTheModelsOwnQk) {
  const std::string model = (kModelsDir / "llama3").string();
  const fs::path fx_path = fs::path(ADAKV_FIXTURES_DIR) / "compress" / "model_llama3.json";
  if (!fs::exists(model + "/config.json") || !fs::exists(fx_path)) GTEST_SKIP() << "fixtures not generated";
  const nlohmann::json fx = nlohmann::json::parse(slurp(fx_path));
  const int length = fx.at("shape").at("length");
  const fs::path json_path = fs::temp_directory_path() / ("adakv_inspect_ref_" + std::to_string(::getpid()) + ".json");
  int checked = 0;
  for (const auto& cs : fx.at("cases")) {
    const nlohmann::json& c = cs.at("config");
    const std::string policy = c.at("policy");
    if (policy == "full" || policy == "kvcompress") continue;
    std::string flags = " --kv-policy " + policy + " --kv-budget " + std::to_string(c.at("budget").get<int>()) +
                        " --kv-window " + std::to_string(c.at("window").get<int>());
    if (c.contains("seed")) flags += " --kv-seed " + std::to_string(c.at("seed").get<int>());
    if (c.contains("sink")) flags += " --kv-sink " + std::to_string(c.at("sink").get<int>());
    // Only policy, budget, window (+ seed / sink): the knob variants are the unit fixtures' job.
    if (c.size() > size_t{3} + (c.contains("seed") ? 1 : 0) + (c.contains("sink") ? 1 : 0)) continue;
    const CliResult r = run_cli("inspect --model " + model + " --prompt " + kText + flags + " --json " + json_path.string());
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const nlohmann::json j = nlohmann::json::parse(slurp(json_path));
    ASSERT_EQ(j.at("prompt_tokens").get<int>(), length) << "the prompt no longer matches the dump";
    for (size_t l = 0; l < cs.at("layers").size(); ++l) {
      const auto& want_masks = cs.at("layers")[l].at("keep_mask");
      for (size_t h = 0; h < want_masks.size(); ++h) {
        const std::string mask = want_masks[h];
        std::vector<int> want;  // entry indices = prompt positions
        for (size_t i = 0; i < mask.size(); ++i) {
          const int nib = std::stoi(mask.substr(i, 1), nullptr, 16);
          for (int b = 0; b < 4; ++b)
            if (nib & (1 << b)) want.push_back(static_cast<int>(4 * i) + b);
        }
        const std::vector<int> got = j.at("layers")[l].at("heads")[h].at("positions");
        EXPECT_EQ(got, want) << cs.at("name").get<std::string>() << " layer " << l << " head " << h;
      }
    }
    ++checked;
  }
  EXPECT_GE(checked, 30);
  fs::remove(json_path);
}

}  // namespace
}  // namespace adakv
