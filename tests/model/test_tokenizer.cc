// Every tokenizer fixture against what transformers 5 (and the tokenizers library on the bare
// tokenizer.json) gave for the same strings: tests/fixtures/tokenizers/cases.json, written by
// tools/fixtures/tokenizers.py.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/mapped_file.h"
#include "io/tokenizer.h"
#include "io/unicode_text.h"

namespace adakv {
namespace {

using json = nlohmann::json;

const std::string kDir = std::string(ADAKV_FIXTURES_DIR) + "/tokenizers";

const json& cases() {
  static const json j = [] {
    auto text = read_text_file(kDir + "/cases.json");
    EXPECT_TRUE(text.has_value()) << text.status().message();
    return text.has_value() ? json::parse(*text) : json::object();
  }();
  return j;
}

std::string show(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out.size() > 120 ? out.substr(0, 120) + "..." : out;
}

// Every case of `fixture` (one entry of cases.json) through `tok`.
void check_cases(const Tokenizer& tok, const json& fixture, const std::string& name) {
  EXPECT_EQ(tok.bos_id(), fixture["bos_id"].is_null() ? -1 : fixture["bos_id"].get<int32_t>());
  ASSERT_FALSE(tok.eos_ids().empty());
  EXPECT_EQ(tok.eos_ids()[0], fixture["eos_id"].get<int32_t>());
  EXPECT_EQ(tok.vocab_size(), fixture["vocab_size"].get<int32_t>());
  int round_trips = 0;
  for (const json& c : fixture["cases"]) {
    const std::string text = c["text"];
    SCOPED_TRACE(name + " text='" + show(text) + "'");
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    const auto ids_ns = c["ids_no_special"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text, true), ids);
    EXPECT_EQ(tok.encode(text, false), ids_ns);
    EXPECT_EQ(tok.decode(ids), c["decode"].get<std::string>());
    EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), c["decode_skip"].get<std::string>());
    EXPECT_EQ(tok.decode(ids_ns), c["decode_no_special"].get<std::string>());
    // Where transformers' round trip gives the text back, ours must too.
    if (c["decode_no_special"].get<std::string>() == text) {
      EXPECT_EQ(tok.decode(tok.encode(text, false)), text);
      ++round_trips;
    }
  }
  // Some strings round-trip in every fixture (not all: SentencePiece drops a leading space,
  // GPT-2's prefix space adds one, NFC and Lowercase change text).
  EXPECT_GT(round_trips, 0);
}

class TokenizerFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerFixture, EncodesAndDecodesLikeTransformers) {
  const std::string name = GetParam();
  auto tok = Tokenizer::load(kDir + "/" + name);
  ASSERT_TRUE(tok.has_value()) << tok.status().message();
  check_cases(**tok, cases().at(name), name);
}

// Streaming the reference ids one at a time gives transformers' decode, in valid UTF-8 pieces.
TEST_P(TokenizerFixture, StreamDecodeEqualsDecode) {
  const std::string name = GetParam();
  auto tok = Tokenizer::load(kDir + "/" + name);
  ASSERT_TRUE(tok.has_value()) << tok.status().message();
  for (const json& c : cases().at(name)["cases"]) {
    SCOPED_TRACE(name + " text='" + show(c["text"]) + "'");
    StreamDecoder stream(*tok, /*skip_special=*/true);
    std::string all;
    for (int32_t id : c["ids"].get<std::vector<int32_t>>()) {
      std::string piece = stream.push(id);
      EXPECT_TRUE(unicode::is_valid_utf8(piece)) << show(piece);
      all += piece;
    }
    all += stream.finish();
    EXPECT_EQ(all, c["decode_skip"].get<std::string>());
  }
}

// The bare tokenizer.json (no tokenizer_config.json) against tokenizers.Tokenizer.from_file:
// for sentencepiece/ this is the Prepend + Replace normalizer that transformers 5 replaces.
TEST_P(TokenizerFixture, BareTokenizerJsonMatchesTokenizersLibrary) {
  const std::string name = GetParam();
  auto text = read_text_file(kDir + "/" + name + "/tokenizer.json");
  ASSERT_TRUE(text.has_value());
  auto tok = Tokenizer::from_json(*text, "", name + "/tokenizer.json");
  ASSERT_TRUE(tok.has_value()) << tok.status().message();
  for (const json& c : cases().at(name)["cases"]) {
    const std::string s = c["text"];
    SCOPED_TRACE(name + " text='" + show(s) + "'");
    EXPECT_EQ((*tok)->encode(s, true), c["raw_ids"].get<std::vector<int32_t>>());
    EXPECT_EQ((*tok)->encode(s, false), c["raw_ids_no_special"].get<std::vector<int32_t>>());
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TokenizerFixture,
                         ::testing::Values("bytelevel", "bytelevel_qwen2", "bytelevel_added", "bytelevel_gpt2", "sentencepiece",
                                           "sentencepiece_v5"));

// A base folder's files with a config.json (model_type) and tokenizer_config.json changes:
// transformers' AutoTokenizer then picks another tokenizer class.
class TokenizerVariant : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerVariant, FollowsTheClassTransformersPicks) {
  const std::string name = GetParam();
  const json& fixture = cases().at(name);
  const std::string base = kDir + "/" + fixture["base"].get<std::string>();
  auto tokenizer_json = read_text_file(base + "/tokenizer.json");
  auto config_text = read_text_file(base + "/tokenizer_config.json");
  ASSERT_TRUE(tokenizer_json.has_value() && config_text.has_value());
  json config = json::parse(*config_text);
  for (const auto& [key, value] : fixture["tokenizer_config_patch"].items()) {
    if (value.is_null()) config.erase(key);
    else config[key] = value;
  }
  auto tok = Tokenizer::from_json(*tokenizer_json, config.dump(), name + "/tokenizer.json",
                                  fixture["model_config"].dump());
  ASSERT_TRUE(tok.has_value()) << tok.status().message();
  check_cases(**tok, fixture, name);
}

INSTANTIATE_TEST_SUITE_P(Variants, TokenizerVariant,
                         ::testing::Values("sentencepiece_mistral", "sentencepiece_llama", "bytelevel_model_qwen2",
                                           "bytelevel_llama_class", "bytelevel_qwen2_noclass",
                                           "bytelevel_config_specials"));

TEST(TokenizerFixtures, SpecialTokensAreNeverSplit) {
  auto tok = Tokenizer::load(kDir + "/bytelevel");
  ASSERT_TRUE(tok.has_value()) << tok.status().message();
  int32_t eot = (*tok)->token_to_id("<|eot_id|>");
  ASSERT_GE(eot, 0);
  EXPECT_TRUE((*tok)->is_special(eot));
  auto ids = (*tok)->encode("a<|eot_id|>b<|eot_id|>", false);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), eot), 2);
  EXPECT_EQ((*tok)->decode(ids, /*skip_special=*/true), "ab");
}

TEST(TokenizerFixtures, EncodesAMegabyteQuickly) {
  auto corpus = read_text_file(kDir + "/cases.json");  // ~400 KB of mixed text, JSON-escaped
  ASSERT_TRUE(corpus.has_value());
  std::string text;
  while (text.size() < (1 << 20)) text += *corpus;
  text.resize(1 << 20);
  for (const char* name : {"bytelevel", "sentencepiece"}) {
    auto tok = Tokenizer::load(kDir + "/" + name);
    ASSERT_TRUE(tok.has_value());
    auto t0 = std::chrono::steady_clock::now();
    auto ids = (*tok)->encode(text, false);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_GT(ids.size(), text.size() / 8);
#if defined(NDEBUG) && !defined(__SANITIZE_ADDRESS__)
    EXPECT_LT(s, 1.0) << name << ": " << s << " s for 1 MB";  // optimized builds only
#endif
    std::printf("%s: encode 1 MB in %.3f s (%zu ids)\n", name, s, ids.size());
  }
}

// `adakv tokenize` prints the same ids as the library.
TEST(TokenizerFixtures, CommandPrintsIds) {
  const json& c = cases().at("bytelevel")["cases"][2];
  std::string cmd = std::string(ADAKV_BINARY_PATH) + " tokenize --model " + kDir + "/bytelevel '" +
                    c["text"].get<std::string>() + "'";
  for (bool special : {true, false}) {
    FILE* p = popen((cmd + (special ? "" : " --no-special")).c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    std::array<char, 256> buf;
    while (fgets(buf.data(), buf.size(), p)) out += buf.data();
    ASSERT_EQ(pclose(p), 0) << out;
    std::string expected;
    for (const json& id : c[special ? "ids" : "ids_no_special"]) {
      expected += (expected.empty() ? "" : " ") + std::to_string(id.get<int32_t>());
    }
    EXPECT_EQ(out, expected + "\n");
  }
}

TEST(TokenizerFixtures, CommandFailsOnMissingModel) {
  std::string cmd = std::string(ADAKV_BINARY_PATH) + " tokenize --model /nonexistent/dir hello 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  std::array<char, 256> buf;
  while (fgets(buf.data(), buf.size(), p)) out += buf.data();
  EXPECT_NE(pclose(p), 0);
  EXPECT_NE(out.find("tokenizer.json"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
}

}  // namespace
}  // namespace adakv
