// Tokenizer loading refuses bad input with a one-line error that names the file and the
// problem: malformed JSON, unsupported model types and stages, inconsistent vocabularies.
#include <gtest/gtest.h>

#include <string>

#include "io/tokenizer.h"

namespace adakv {
namespace {

constexpr const char* kSource = "dir/tokenizer.json";

Status load_error(const std::string& json) {
  auto t = Tokenizer::from_json(json, "", kSource);
  EXPECT_FALSE(t.has_value()) << "loaded: " << json;
  return t.status();
}

void expect_error(const Status& s, StatusCode code, const std::string& needle) {
  EXPECT_EQ(s.code(), code) << s.message();
  EXPECT_EQ(s.message().rfind(std::string(kSource) + ": ", 0), 0u) << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
  EXPECT_EQ(s.message().find('\n'), std::string::npos) << s.message();
}

const std::string kBpe = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";

TEST(TokenizerErrors, MinimalBpeLoads) {
  auto t = Tokenizer::from_json("{" + kBpe + "}", "", kSource);
  ASSERT_TRUE(t.has_value()) << t.status().message();
  EXPECT_EQ((*t)->encode("abba", false), (std::vector<int32_t>{2, 1, 0}));
  EXPECT_EQ((*t)->decode({2, 1}), "ab b");  // no decoder: tokens joined by spaces
  EXPECT_EQ((*t)->bos_id(), -1);
}

TEST(TokenizerErrors, MalformedJson) {
  expect_error(load_error("{\"model\": {"), StatusCode::kDataLoss, "not valid JSON");
  expect_error(load_error(""), StatusCode::kDataLoss, "not valid JSON");
  expect_error(load_error("[1, 2]"), StatusCode::kDataLoss, "not a JSON object");
  expect_error(load_error("{}"), StatusCode::kDataLoss, "model");
}

TEST(TokenizerErrors, WrongTypesAreDataLoss) {
  expect_error(load_error(R"({"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": []}})"),
               StatusCode::kDataLoss, "'a'");
  expect_error(load_error(R"({"model": {"type": "BPE", "vocab": [], "merges": []}})"), StatusCode::kDataLoss,
               "vocab");
  expect_error(load_error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [7]}})"),
               StatusCode::kDataLoss, "merge");
  expect_error(load_error("{" + kBpe + R"(, "added_tokens": [{"id": -1, "content": "x"}]})"),
               StatusCode::kDataLoss, "added token");
  expect_error(load_error("{" + kBpe + R"(, "decoder": {"type": "Strip", "start": "one"}})"),
               StatusCode::kDataLoss, "Strip");
}

TEST(TokenizerErrors, UnknownModelTypeIsUnimplemented) {
  expect_error(load_error(R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})"), StatusCode::kUnimplemented,
               "WordPiece");
  expect_error(load_error(R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})"), StatusCode::kUnimplemented,
               "Unigram");
}

TEST(TokenizerErrors, UnsupportedStagesAreUnimplemented) {
  expect_error(load_error("{" + kBpe + R"(, "normalizer": {"type": "BertNormalizer"}})"),
               StatusCode::kUnimplemented, "BertNormalizer");
  expect_error(load_error("{" + kBpe + R"(, "pre_tokenizer": {"type": "Whitespace"}})"),
               StatusCode::kUnimplemented, "Whitespace");
  expect_error(load_error("{" + kBpe + R"(, "decoder": {"type": "WordPiece"}})"), StatusCode::kUnimplemented,
               "WordPiece");
  expect_error(load_error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": 0.1}})"),
               StatusCode::kUnimplemented, "dropout");
}

TEST(TokenizerErrors, InconsistentVocabularyIsDataLoss) {
  // A merge of tokens that are not in the vocabulary.
  expect_error(load_error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a x"]}})"),
               StatusCode::kDataLoss, "a x");
  // unk_token missing from the vocabulary.
  expect_error(load_error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "unk_token": "<unk>"}})"),
               StatusCode::kDataLoss, "<unk>");
  // Ids far beyond the number of tokens.
  expect_error(load_error(R"({"model": {"type": "BPE", "vocab": {"a": 2000000000}, "merges": []}})"),
               StatusCode::kDataLoss, "2000000000");
  // A template naming a token it does not define.
  expect_error(load_error("{" + kBpe + R"(, "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}], "special_tokens": {}}})"),
               StatusCode::kDataLoss, "<s>");
}

TEST(TokenizerErrors, BadRegexIsDataLoss) {
  expect_error(load_error("{" + kBpe + R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"},
      "behavior": "Isolated"}})"),
               StatusCode::kDataLoss, "regex");
}

// Found by fuzz_tokenizer_json: the refusal quoted the pattern, and a pattern holding a newline
// (JSON "\n") split the message over two lines. It is shown as \x0a now.
TEST(TokenizerErrors, BadRegexWithANewlineStaysOnOneLine) {
  expect_error(load_error("{" + kBpe + R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[^\r\n]\\p{"},
      "behavior": "Isolated"}})"),
               StatusCode::kDataLoss, "[^\\x0d\\x0a]");
}

// Names quoted from the file (types, tokens, keys) may hold any character: every refusal stays on
// one line.
TEST(TokenizerErrors, QuotedNamesWithNewlinesStayOnOneLine) {
  expect_error(load_error(R"({"model": {"type": "BP\nE", "vocab": {}, "merges": []}})"), StatusCode::kUnimplemented,
               "BP\\x0aE");
  expect_error(load_error("{" + kBpe + R"(, "decoder": {"type": "Strip\r\n"}})"), StatusCode::kUnimplemented,
               "Strip\\x0d\\x0a");
}

TEST(TokenizerErrors, MalformedConfigIsDataLoss) {
  auto t = Tokenizer::from_json("{" + kBpe + "}", "{not json", kSource);
  ASSERT_FALSE(t.has_value());
  expect_error(t.status(), StatusCode::kDataLoss, "tokenizer_config.json");
}

TEST(TokenizerErrors, MissingFileIsNotFound) {
  auto t = Tokenizer::load("/nonexistent/model");
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.status().code(), StatusCode::kNotFound);
  EXPECT_NE(t.status().message().find("/nonexistent/model/tokenizer.json"), std::string::npos)
      << t.status().message();
  EXPECT_EQ(t.status().message().find('\n'), std::string::npos);
}

}  // namespace
}  // namespace adakv
