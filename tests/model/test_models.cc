// Every tiny checkpoint under tests/fixtures/models against what transformers computed for it
// (tools/fixtures/models.py): the prompt's logits at every position within 1e-4 relative error,
// the same logits when the prompt arrives in chunks or token by token (decode path), and the 16
// greedy tokens identical. Also: the layer observer sees what the cache holds, a checkpoint with
// a tensor removed is refused in one line naming it, and a request beyond the context is refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <unistd.h>
#include <vector>

#include "engine/generator.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"
#include "model/transformer.h"

namespace adakv {
namespace {

namespace fs = std::filesystem;

const fs::path kModelsDir = fs::path(ADAKV_FIXTURES_DIR) / "models";

std::vector<std::string> fixture_names() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(kModelsDir, ec)) {
    if (e.is_directory() && fs::exists(e.path() / "reference.json")) names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

struct Reference {
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> greedy_ids;
  int64_t vocab = 0;
  std::vector<float> logits;  // [prompt_len][vocab]
};

Reference read_reference(const fs::path& dir) {
  Reference r;
  std::ifstream f(dir / "reference.json");
  const nlohmann::json j = nlohmann::json::parse(f);
  r.prompt_ids = j.at("prompt_ids").get<std::vector<int32_t>>();
  r.greedy_ids = j.at("greedy_ids").get<std::vector<int32_t>>();
  const auto shape = j.at("logits_shape").get<std::vector<int64_t>>();
  EXPECT_EQ(shape.at(0), static_cast<int64_t>(r.prompt_ids.size()));
  r.vocab = shape.at(1);
  r.logits.resize(static_cast<size_t>(shape[0] * shape[1]));
  std::ifstream lf(dir / j.at("logits_file").get<std::string>(), std::ios::binary);
  lf.read(reinterpret_cast<char*>(r.logits.data()), static_cast<std::streamsize>(r.logits.size() * sizeof(float)));
  EXPECT_TRUE(lf.good()) << "short logits file in " << dir;
  return r;
}

// A cache big enough for `tokens` tokens in every row.
struct Cache {
  Cache(const Transformer& m, int64_t tokens, int32_t page_size = 4)
      : layout(m.kv_layout(page_size)),
        pages((tokens + page_size - 1) / page_size * layout.num_layers * layout.num_kv_heads),
        manager(layout, pages),
        storage(layout, pages),
        seq(manager.add_sequence()) {}
  KvContext ctx() { return KvContext{&manager, &storage, seq}; }

  KvLayout layout;
  int64_t pages;
  KvCacheManager manager;
  CpuKvStorage storage;
  SeqId seq;
};

// Compares logits rows [first, first + rows) of the reference with `got` [rows][vocab].
void expect_logits_close(const Reference& ref, int64_t first, const std::vector<float>& got, const std::string& what) {
  const int64_t rows = static_cast<int64_t>(got.size()) / ref.vocab;
  double worst_rel = 0.0, worst_abs = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double diff2 = 0.0, ref2 = 0.0;
    for (int64_t v = 0; v < ref.vocab; ++v) {
      const double a = got[r * ref.vocab + v];
      const double b = ref.logits[(first + r) * ref.vocab + v];
      diff2 += (a - b) * (a - b);
      ref2 += b * b;
      worst_abs = std::max(worst_abs, std::abs(a - b));
    }
    const double rel = std::sqrt(diff2) / std::sqrt(ref2);
    worst_rel = std::max(worst_rel, rel);
    EXPECT_LT(rel, 1e-4) << what << ": position " << first + r;
  }
  std::printf("  %s: %lld positions, max relative error %.2e, max abs diff %.2e\n", what.c_str(),
              static_cast<long long>(rows), worst_rel, worst_abs);
}

class ModelFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = kModelsDir / GetParam();
    auto loaded = Transformer::load(dir_.string());
    ASSERT_TRUE(loaded.has_value()) << loaded.status().message();
    model_ = std::move(loaded).value();
    ref_ = read_reference(dir_);
    ASSERT_EQ(ref_.vocab, model_->config().vocab_size);
  }

  fs::path dir_;
  std::unique_ptr<Transformer> model_;
  Reference ref_;
};

TEST_P(ModelFixture, PromptLogitsMatchTransformers) {
  Cache cache(*model_, static_cast<int64_t>(ref_.prompt_ids.size()));
  ForwardOptions opts;
  opts.all_logits = true;
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(ref_.prompt_ids, cache.ctx(), opts, &logits).is_ok());
  ASSERT_EQ(logits.size(), ref_.logits.size());
  expect_logits_close(ref_, 0, logits, GetParam() + " prefill");
  EXPECT_EQ(cache.manager.logical_length(cache.seq), static_cast<int64_t>(ref_.prompt_ids.size()));
}

TEST_P(ModelFixture, ChunkedAndTokenByTokenMatchPrefill) {
  // First 7 tokens as one chunk, the next 5 as a second chunk (multi-token append to a filled
  // cache), the rest one at a time (the decode path).
  const int64_t n = static_cast<int64_t>(ref_.prompt_ids.size());
  ASSERT_GT(n, 12);
  Cache cache(*model_, n);
  ForwardOptions opts;
  opts.all_logits = true;
  const std::span<const int32_t> ids(ref_.prompt_ids);
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(ids.subspan(0, 7), cache.ctx(), opts, &logits).is_ok());
  expect_logits_close(ref_, 0, logits, GetParam() + " chunk 1");
  ASSERT_TRUE(model_->forward(ids.subspan(7, 5), cache.ctx(), opts, &logits).is_ok());
  expect_logits_close(ref_, 7, logits, GetParam() + " chunk 2");
  opts.all_logits = false;
  for (int64_t t = 12; t < n; ++t) {
    ASSERT_TRUE(model_->forward(ids.subspan(t, 1), cache.ctx(), opts, &logits).is_ok());
    ASSERT_EQ(logits.size(), static_cast<size_t>(ref_.vocab));
    double diff2 = 0.0, ref2 = 0.0;
    for (int64_t v = 0; v < ref_.vocab; ++v) {
      const double b = ref_.logits[t * ref_.vocab + v];
      diff2 += (logits[v] - b) * (logits[v] - b);
      ref2 += b * b;
    }
    EXPECT_LT(std::sqrt(diff2 / ref2), 1e-4) << "decode position " << t;
  }
}

TEST_P(ModelFixture, GreedyTokensMatchTransformers) {
  GenerateOptions opts;
  opts.max_new_tokens = static_cast<int64_t>(ref_.greedy_ids.size());
  opts.ignore_eos = true;
  opts.page_size = 16;
  auto result = generate(*model_, ref_.prompt_ids, opts, nullptr);
  ASSERT_TRUE(result.has_value()) << result.status().message();
  EXPECT_EQ(result->tokens, ref_.greedy_ids);
  EXPECT_EQ(result->stats.decode_steps, opts.max_new_tokens - 1);
}

TEST_P(ModelFixture, GreedyStopsAtTheFirstEndToken) {
  GenerateOptions opts;
  opts.max_new_tokens = static_cast<int64_t>(ref_.greedy_ids.size());
  opts.eos_ids = model_->config().eos_token_ids;
  ASSERT_FALSE(opts.eos_ids.empty());
  std::vector<int32_t> want;
  bool stops = false;
  for (int32_t id : ref_.greedy_ids) {
    if (std::find(opts.eos_ids.begin(), opts.eos_ids.end(), id) != opts.eos_ids.end()) {
      stops = true;
      break;
    }
    want.push_back(id);
  }
  std::vector<int32_t> streamed;
  auto result = generate(*model_, ref_.prompt_ids, opts, [&](int32_t id) { streamed.push_back(id); });
  ASSERT_TRUE(result.has_value()) << result.status().message();
  EXPECT_EQ(result->tokens, want);
  EXPECT_EQ(streamed, want);
  EXPECT_EQ(result->stopped_at_eos, stops);
}

// Records what the forward shows each layer; checks the attention tap independently: at
// position 0 a query sees exactly one entry, so its attention output is that entry's value.
class RecordingObserver : public LayerObserver {
 public:
  RecordingObserver(const KvCacheManager* m, const CpuKvStorage* s) : manager_(m), storage_(s) {}
  void on_layer_queries(const LayerQueries& q) override {
    layers.push_back(q.layer);
    ASSERT_EQ(static_cast<int64_t>(q.q.size()), q.n * q.num_heads * q.head_dim);
    ASSERT_EQ(static_cast<int64_t>(q.positions.size()), q.n);
    positions.assign(q.positions.begin(), q.positions.end());
    // This layer's rows hold the step's entries already.
    for (int32_t h = 0; h < manager_->layout().num_kv_heads; ++h) {
      EXPECT_EQ(manager_->length(q.seq, q.layer, h), positions.back() + 1);
    }
  }
  void on_attention_output(const LayerAttentionOutput& a) override {
    const int64_t kv_heads = manager_->layout().num_kv_heads;
    const int64_t d = manager_->layout().head_dim;
    const int64_t heads = static_cast<int64_t>(a.out.size()) / (a.n * d);
    for (int64_t h = 0; h < heads; ++h) {
      const int32_t kvh = static_cast<int32_t>(h / (heads / kv_heads));
      const float* v0 = storage_->value(manager_->slot(a.seq, a.layer, kvh, 0));
      for (int64_t i = 0; i < d; ++i) {
        ASSERT_NEAR(a.out[h * d + i], v0[i], 1e-6) << "layer " << a.layer << " head " << h;
      }
    }
    ++taps;
  }
  std::vector<int32_t> layers;
  std::vector<int32_t> positions;
  int taps = 0;

 private:
  const KvCacheManager* manager_;
  const CpuKvStorage* storage_;
};

TEST_P(ModelFixture, ObserverSeesEveryLayerAfterItsKvIsWritten) {
  Cache cache(*model_, static_cast<int64_t>(ref_.prompt_ids.size()));
  RecordingObserver obs(&cache.manager, &cache.storage);
  ForwardOptions opts;
  opts.observer = &obs;
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(ref_.prompt_ids, cache.ctx(), opts, &logits).is_ok());
  std::vector<int32_t> want(static_cast<size_t>(model_->config().num_layers));
  for (size_t i = 0; i < want.size(); ++i) want[i] = static_cast<int32_t>(i);
  EXPECT_EQ(obs.layers, want);
  ASSERT_EQ(obs.positions.size(), ref_.prompt_ids.size());
  for (size_t i = 0; i < obs.positions.size(); ++i) EXPECT_EQ(obs.positions[i], static_cast<int32_t>(i));
  EXPECT_EQ(obs.taps, model_->config().num_layers);
}

TEST_P(ModelFixture, RequestBeyondTheContextIsRefused) {
  GenerateOptions opts;
  const int64_t ctx = model_->context_length();
  const int64_t n_prompt = static_cast<int64_t>(ref_.prompt_ids.size());
  opts.max_new_tokens = ctx - n_prompt + 1;
  auto result = generate(*model_, ref_.prompt_ids, opts, nullptr);
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.status().message(), "prompt of " + std::to_string(n_prompt) + " tokens + " +
                                           std::to_string(opts.max_new_tokens) +
                                           " new tokens exceeds the model's context of " + std::to_string(ctx));
  opts.max_new_tokens = ctx - n_prompt;  // exactly the context: accepted
  opts.ignore_eos = true;
  if (ctx <= 256) {
    auto ok = generate(*model_, ref_.prompt_ids, opts, nullptr);
    ASSERT_TRUE(ok.has_value()) << ok.status().message();
    EXPECT_EQ(static_cast<int64_t>(ok->tokens.size()), opts.max_new_tokens);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelFixture, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(ModelFixture);

TEST(ModelFixtures, Present) {
  if (fixture_names().empty()) {
    GTEST_SKIP() << "no model fixtures under " << kModelsDir
                 << "; generate them with `python3 tools/make_fixtures.py models` (needs torch)";
  }
  for (const char* name : {"llama2", "llama3", "llama3_sharded", "llama3_v4config", "llama_linear", "llama_tied",
                           "mistral", "qwen2", "qwen3"}) {
    EXPECT_TRUE(fs::exists(kModelsDir / name / "reference.json")) << name;
  }
}

TEST(ModelFixtures, ContextIsTheSlidingWindowWhenSmaller) {
  if (!fs::exists(kModelsDir / "mistral" / "reference.json")) GTEST_SKIP() << "mistral fixture not generated";
  auto m = Transformer::load((kModelsDir / "mistral").string());
  ASSERT_TRUE(m.has_value()) << m.status().message();
  EXPECT_EQ((*m)->config().sliding_window, 64);
  EXPECT_EQ((*m)->context_length(), 64);
}

// Rewrites a safetensors file without one tensor (header re-serialised, data re-packed).
void write_safetensors_without(const fs::path& src, const fs::path& dst, const std::string& drop) {
  std::ifstream in(src, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  const nlohmann::json header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(header_len));
  const char* data = bytes.data() + 8 + header_len;
  nlohmann::json out_header = nlohmann::json::object();
  std::string out_data;
  for (const auto& [name, info] : header.items()) {
    if (name == drop) continue;
    if (name == "__metadata__") {
      out_header[name] = info;
      continue;
    }
    const auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
    nlohmann::json entry = info;
    entry["data_offsets"] = {out_data.size(), out_data.size() + (offsets[1] - offsets[0])};
    out_data.append(data + offsets[0], offsets[1] - offsets[0]);
    out_header[name] = entry;
  }
  std::string h = out_header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  const uint64_t len = h.size();
  std::ofstream out(dst, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  out.write(out_data.data(), static_cast<std::streamsize>(out_data.size()));
}

TEST(ModelFixtures, MissingTensorIsAOneLineErrorNamingIt) {
  const fs::path src = kModelsDir / "qwen2";
  if (!fs::exists(src / "reference.json")) GTEST_SKIP() << "qwen2 fixture not generated";
  const fs::path tmp = fs::temp_directory_path() / ("adakv_missing_tensor_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  for (const auto& e : fs::directory_iterator(src)) {
    if (e.path().filename() != "model.safetensors") fs::copy(e.path(), tmp / e.path().filename());
  }
  // Sanity: the re-packed file without dropping anything loads.
  write_safetensors_without(src / "model.safetensors", tmp / "model.safetensors", "");
  ASSERT_TRUE(Transformer::load(tmp.string()).has_value());
  for (const std::string name : {"model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.down_proj.weight",
                                 "model.norm.weight", "model.embed_tokens.weight"}) {
    write_safetensors_without(src / "model.safetensors", tmp / "model.safetensors", name);
    auto m = Transformer::load(tmp.string());
    ASSERT_FALSE(m.has_value()) << name;
    const std::string& msg = m.status().message();
    EXPECT_NE(msg.find(name), std::string::npos) << msg;
    EXPECT_NE(msg.find(tmp.string()), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace adakv
