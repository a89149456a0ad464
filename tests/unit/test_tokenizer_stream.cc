// StreamDecoder on a hand-built SentencePiece-style tokenizer whose ids for "hi 😀 hi" are
// derived by hand: the emoji is not in the vocabulary, so byte fallback spells it as four
// <0xNN> tokens, and the stream must hold them back until the character is complete.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/tokenizer.h"
#include "io/unicode_text.h"

namespace adakv {
namespace {

using json = nlohmann::json;
const std::string kMeta = "\xE2\x96\x81";  // ▁

// Vocab: <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF> = 3..258, ▁=259 h=260 i=261 ▁h=262 ▁hi=263.
std::string tiny_spm_json() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  vocab[kMeta] = 259;
  vocab["h"] = 260;
  vocab["i"] = 261;
  vocab[kMeta + "h"] = 262;
  vocab[kMeta + "hi"] = 263;
  json j = {
      {"added_tokens", json::array({{{"id", 0}, {"content", "<unk>"}, {"special", true}, {"normalized", false}},
                                    {{"id", 1}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
                                    {{"id", 2}, {"content", "</s>"}, {"special", true}, {"normalized", false}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", "first"}, {"split", false}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders", json::array({{{"type", "Replace"}, {"pattern", {{"String", kMeta}}}, {"content", " "}},
                                  {{"type", "ByteFallback"}},
                                  {{"type", "Fuse"}},
                                  {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}}},
      {"model",
       {{"type", "BPE"}, {"unk_token", "<unk>"}, {"fuse_unk", true}, {"byte_fallback", true}, {"vocab", vocab},
        {"merges", json::array({kMeta + " h", json::array({kMeta + "h", "i"})})}}}};
  return j.dump();
}

std::shared_ptr<const Tokenizer> tiny() {
  auto t = Tokenizer::from_json(tiny_spm_json(), "", "tiny/tokenizer.json");
  EXPECT_TRUE(t.has_value()) << t.status().message();
  return t.has_value() ? *t : nullptr;
}

const std::string kText = "hi \xF0\x9F\x98\x80 hi";  // "hi 😀 hi"
// ▁hi ▁ <0xF0> <0x9F> <0x98> <0x80> ▁hi
const std::vector<int32_t> kIds = {263, 259, 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80, 263};

TEST(TokenizerStream, HandBuiltTokenizerEncodesWithByteFallback) {
  auto tok = tiny();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->encode(kText, false), kIds);
  std::vector<int32_t> with_bos = kIds;
  with_bos.insert(with_bos.begin(), 1);
  EXPECT_EQ(tok->encode(kText, true), with_bos);
  EXPECT_EQ(tok->decode(kIds), kText);
  EXPECT_EQ(tok->decode(with_bos), "<s> hi \xF0\x9F\x98\x80 hi");
  EXPECT_EQ(tok->decode(with_bos, /*skip_special=*/true), kText);
}

TEST(TokenizerStream, HoldsBackASplitCharacterUntilComplete) {
  auto tok = tiny();
  ASSERT_NE(tok, nullptr);
  StreamDecoder stream(tok);
  std::vector<std::string> pieces;
  for (int32_t id : kIds) pieces.push_back(stream.push(id));
  pieces.push_back(stream.finish());
  const std::vector<std::string> expected = {"hi", " ", "", "", "", "\xF0\x9F\x98\x80", " hi", ""};
  EXPECT_EQ(pieces, expected);
}

TEST(TokenizerStream, SkipsSpecialTokensAndFlushesAnIncompleteTail) {
  auto tok = tiny();
  ASSERT_NE(tok, nullptr);
  StreamDecoder stream(tok, /*skip_special=*/true);
  std::string out = stream.push(1);  // <s>
  out += stream.push(263);
  out += stream.push(3 + 0xF0);  // first byte of a 4-byte character, never completed
  out += stream.push(3 + 0x9F);
  EXPECT_EQ(out, "hi");
  // At the end the incomplete bytes come out as U+FFFD each, as decode() gives them.
  std::string tail = stream.finish();
  EXPECT_EQ(tail, "\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(out + tail, tok->decode({1, 263, 3 + 0xF0, 3 + 0x9F}, true));
}

TEST(TokenizerStream, EveryPieceIsValidUtf8) {
  auto tok = tiny();
  ASSERT_NE(tok, nullptr);
  // Every character of a mixed string through byte fallback, pushed one id at a time.
  const std::string text = "h\xC3\xA9 \xE4\xB8\xAD\xF0\x9F\x9A\x80 i\xE2\x82\xAC";  // hé 中🚀 i€
  auto ids = tok->encode(text, false);
  StreamDecoder stream(tok);
  std::string all;
  for (int32_t id : ids) {
    std::string piece = stream.push(id);
    EXPECT_TRUE(unicode::is_valid_utf8(piece));
    all += piece;
  }
  all += stream.finish();
  EXPECT_EQ(all, text);
}

}  // namespace
}  // namespace adakv
