// The shipped model (models/adakv-tiny-v1) against transformers' outputs recorded by
// tools/fixtures/shipped_model.py: prompt ids from its tokenizer, the top logits after the
// prompt, and the greedy continuation token for token (fp32 compute from the bf16 weights).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/generator.h"
#include "io/tokenizer.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"
#include "model/transformer.h"

namespace adakv {
namespace {

const std::string kModelDir = std::string(ADAKV_SOURCE_DIR) + "/models/adakv-tiny-v1";
const std::string kReference = std::string(ADAKV_FIXTURES_DIR) + "/shipped/adakv-tiny-v1.json";

nlohmann::json load_reference() {
  std::ifstream in(kReference);
  EXPECT_TRUE(in.good()) << "missing " << kReference;
  return nlohmann::json::parse(in);
}

class ShippedModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = Transformer::load(kModelDir);
    ASSERT_TRUE(model.has_value()) << model.status().message();
    model_ = std::move(model).value().release();
    auto tok = Tokenizer::load(kModelDir);
    ASSERT_TRUE(tok.has_value()) << tok.status().message();
    tokenizer_ = new std::shared_ptr<Tokenizer>(std::move(tok).value());
  }
  static void TearDownTestSuite() {
    delete model_;
    delete tokenizer_;
  }
  static Transformer* model_;
  static std::shared_ptr<Tokenizer>* tokenizer_;
};
Transformer* ShippedModel::model_ = nullptr;
std::shared_ptr<Tokenizer>* ShippedModel::tokenizer_ = nullptr;

TEST_F(ShippedModel, TokenizerGivesTransformersPromptIds) {
  const auto ref = load_reference();  // kept alive: the loop iterates a reference into it
  ASSERT_EQ(ref["cases"].size(), 3u);
  for (const auto& c : ref["cases"]) {
    const auto ids = (*tokenizer_)->encode(c["prompt"].get<std::string>(), true);
    EXPECT_EQ(ids, c["prompt_ids"].get<std::vector<int32_t>>());
  }
}

TEST_F(ShippedModel, TopLogitsAfterThePromptMatchTransformers) {
  const auto ref = load_reference();
  ASSERT_EQ(ref["cases"].size(), 3u);
  for (const auto& c : ref["cases"]) {
    const auto ids = c["prompt_ids"].get<std::vector<int32_t>>();
    const KvLayout layout = model_->kv_layout(16);
    const int64_t pages = layout.num_layers * layout.num_kv_heads * (int64_t(ids.size()) / 16 + 2);
    KvCacheManager manager(layout, pages);
    CpuKvStorage storage(layout, pages);
    const SeqId seq = manager.add_sequence();
    std::vector<float> logits;
    ASSERT_TRUE(model_->forward(ids, KvContext{&manager, &storage, seq}, ForwardOptions{}, &logits).is_ok());
    const auto top_ids = c["top10_ids"].get<std::vector<int32_t>>();
    const auto top_vals = c["top10_logits"].get<std::vector<double>>();
    for (size_t i = 0; i < top_ids.size(); ++i) {
      const double got = logits[static_cast<size_t>(top_ids[i])];
      EXPECT_NEAR(got, top_vals[i], 1e-4 * std::max(1.0, std::abs(top_vals[i]))) << "prompt of " << ids.size()
                                                                                 << " tokens, rank " << i;
    }
  }
}

TEST_F(ShippedModel, GreedyOutputEqualsTransformers) {
  const auto ref = load_reference();
  ASSERT_EQ(ref["cases"].size(), 3u);
  for (const auto& c : ref["cases"]) {
    const auto prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    GenerateOptions opt;
    opt.max_new_tokens = ref["max_new_tokens"].get<int64_t>();
    opt.eos_ids = ref["eos_ids"].get<std::vector<int32_t>>();
    auto result = generate(*model_, prompt, opt, {});
    ASSERT_TRUE(result.has_value()) << result.status().message();
    EXPECT_EQ(result->tokens, c["greedy_ids"].get<std::vector<int32_t>>()) << "prompt: " << c["prompt_ids"].size()
                                                                           << " tokens";
    EXPECT_EQ(result->stopped_at_eos, c["stopped_at_eos"].get<bool>());
    EXPECT_EQ((*tokenizer_)->decode(result->tokens, true), c["greedy_text"].get<std::string>());
  }
}

}  // namespace
}  // namespace adakv
