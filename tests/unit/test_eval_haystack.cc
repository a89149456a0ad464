// The haystack builder (src/eval/haystack.h) with the test model's real tokenizer and the
// shipped held-out text: units cut where byte-level BPE does not merge (so summed unit counts
// equal the tokenizer's count of the whole), contexts at the requested length, needles at the
// requested depth as measured by re-encoding the text before them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "eval/haystack.h"
#include "io/tokenizer.h"

namespace adakv::eval {
namespace {

const std::string kModelDir = std::string(ADAKV_SOURCE_DIR) + "/models/adakv-tiny-v1";
const std::string kHaystackPath = std::string(ADAKV_SOURCE_DIR) + "/data/haystack/validation.txt";

TokenizeFn model_tokenizer() {
  static std::shared_ptr<Tokenizer> tok = [] {
    auto t = Tokenizer::load(kModelDir);
    EXPECT_TRUE(t.has_value()) << t.status().message();
    return *t;
  }();
  return [t = tok](std::string_view s) { return t->encode(s, /*add_special=*/true); };
}

std::shared_ptr<const Haystack> shipped_haystack() {
  static std::shared_ptr<const Haystack> hay = [] {
    auto h = Haystack::load(kHaystackPath, model_tokenizer());
    EXPECT_TRUE(h.has_value()) << h.status().message();
    return *h;
  }();
  return hay;
}

// Bytes as token ids: counts are lengths in bytes, so expectations can be computed by hand.
TokenizeFn byte_tokenizer() {
  return [](std::string_view s) {
    std::vector<int32_t> ids{-1};  // a BOS, to check that it is counted once
    for (unsigned char c : s) ids.push_back(c);
    return ids;
  };
}

std::vector<std::string> units_of(const Haystack& h) {
  std::vector<std::string> out;
  for (size_t i = 0; i < h.num_units(); ++i) out.emplace_back(h.unit(i));
  return out;
}

TEST(EvalHaystack, CutsAfterSentenceEndsNotAfterTitles) {
  auto h = Haystack::from_text("Mr. Smith went home. He slept!  Then J. Doe came.\nHe said \"Go.\" And\n\nNext para",
                               byte_tokenizer());
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(units_of(**h), (std::vector<std::string>{"Mr. Smith went home.", " He slept!", "  Then J. Doe came.\n",
                                                    "He said \"Go.\"", " And\n\n", "Next para"}));
  EXPECT_EQ((*h)->counter().special_tokens(), 1);
  EXPECT_EQ((*h)->counter().count("abc"), 3);
  EXPECT_EQ((*h)->counter().encode_count("abc"), 4);
}

TEST(EvalHaystack, UnitsCoverTheTextAndTokenCountsAdd) {
  auto hay = shipped_haystack();
  ASSERT_NE(hay, nullptr);
  std::string joined;
  for (size_t i = 0; i < hay->num_units(); ++i) joined.append(hay->unit(i));
  EXPECT_EQ(joined, hay->text());
  EXPECT_GT(hay->num_units(), 10000u);
  // The premise of the builder: the tokens of consecutive units are the sum of their own.
  for (size_t start : {0ul, 3000ul, 9000ul, hay->num_units() - 400}) {
    std::string text;
    int summed = 0;
    for (size_t i = start; i < start + 400; ++i) {
      text.append(hay->unit(i));
      summed += hay->unit_tokens(i);
    }
    EXPECT_EQ(hay->counter().count(text), summed) << "units " << start << "..";
  }
}

TEST(EvalHaystack, ContextLengthAndNeedleDepth) {
  auto hay = shipped_haystack();
  ASSERT_NE(hay, nullptr);
  const TokenCounter& counter = hay->counter();
  Rng rng(7);
  for (int tokens : {300, 1000, 4000, 8000}) {
    for (double depth : {0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0}) {
      const Needle needle{"The pass key is 12345. Remember it. 12345 is the pass key.", depth};
      auto ctx = hay->build(tokens, {needle}, rng);
      ASSERT_TRUE(ctx.has_value()) << ctx.status().message();
      const int real = counter.count(ctx->text);
      EXPECT_EQ(real, ctx->tokens);
      EXPECT_LE(real, tokens);
      EXPECT_GE(real, tokens - 6) << "depth " << depth;
      EXPECT_FALSE(std::isspace(static_cast<unsigned char>(ctx->text.front())));
      EXPECT_FALSE(std::isspace(static_cast<unsigned char>(ctx->text.back())));
      // The needle is where the context says, and the tokens before it are as counted.
      const size_t off = ctx->needle_offsets[0];
      ASSERT_EQ(ctx->text.compare(off, needle.text.size(), needle.text), 0);
      const int before = counter.count(std::string_view(ctx->text).substr(0, off));
      EXPECT_LE(std::abs(before - ctx->needle_token_offsets[0]), 1);
      // Measured depth: haystack tokens before the needle over all haystack tokens.
      const int needle_tokens = real - ctx->haystack_tokens;
      const double measured = static_cast<double>(before) / (real - needle_tokens);
      EXPECT_NEAR(measured, ctx->needle_depths[0], 2.0 / ctx->haystack_tokens);
      // Nearest sentence boundary: within 120 tokens (0.5 % of 8K) of the requested depth.
      EXPECT_LE(std::abs(measured - depth) * ctx->haystack_tokens, 120.0) << tokens << " @ " << depth;
    }
  }
}

TEST(EvalHaystack, SeveralNeedlesKeepTheirOrder) {
  auto hay = shipped_haystack();
  ASSERT_NE(hay, nullptr);
  Rng rng(11);
  // Given out of depth order: placed by depth, reported in the given order.
  std::vector<Needle> needles{{"Needle C.", 0.9}, {"Needle A.", 0.1}, {"Needle B.", 0.5}, {"Needle B2.", 0.5}};
  auto ctx = hay->build(2000, needles, rng);
  ASSERT_TRUE(ctx.has_value());
  EXPECT_LT(ctx->needle_offsets[1], ctx->needle_offsets[2]);
  EXPECT_LT(ctx->needle_offsets[2], ctx->needle_offsets[3]);
  EXPECT_LT(ctx->needle_offsets[3], ctx->needle_offsets[0]);
  for (size_t i = 0; i < needles.size(); ++i) {
    EXPECT_EQ(ctx->text.compare(ctx->needle_offsets[i], needles[i].text.size(), needles[i].text), 0);
    EXPECT_NEAR(ctx->needle_depths[i], needles[i].depth, 0.06);
  }
}

TEST(EvalHaystack, DeterministicInTheRandomState) {
  auto hay = shipped_haystack();
  ASSERT_NE(hay, nullptr);
  // A second haystack object (cold caches) gives the same context for the same state.
  auto fresh = Haystack::load(kHaystackPath, model_tokenizer());
  ASSERT_TRUE(fresh.has_value());
  Rng a(99), b(99), c(100);
  auto x = hay->build(1500, {{"N.", 0.3}}, a);
  auto y = (*fresh)->build(1500, {{"N.", 0.3}}, b);
  auto z = hay->build(1500, {{"N.", 0.3}}, c);
  ASSERT_TRUE(x.has_value() && y.has_value() && z.has_value());
  EXPECT_EQ(x->text, y->text);
  EXPECT_NE(x->text, z->text);
}

TEST(EvalHaystack, Errors) {
  auto hay = shipped_haystack();
  ASSERT_NE(hay, nullptr);
  Rng rng(1);
  auto too_small = hay->build(5, {{"A needle that is far longer than five tokens.", 0.5}}, rng);
  EXPECT_EQ(too_small.status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(hay->build(100, {{"x", 1.5}}, rng).status().code(), StatusCode::kInvalidArgument);
  auto tiny = Haystack::from_text("One sentence. Two sentences.", byte_tokenizer(), "tiny.txt");
  ASSERT_TRUE(tiny.has_value());
  auto over = (*tiny)->build(1000, {}, rng);
  ASSERT_FALSE(over.has_value());
  EXPECT_NE(over.status().message().find("tiny.txt"), std::string::npos) << over.status().message();
  EXPECT_FALSE(Haystack::from_text("  \n", byte_tokenizer()).has_value());
  EXPECT_FALSE(Haystack::load("/nonexistent/haystack.txt", byte_tokenizer()).has_value());
}

TEST(EvalHaystack, WordsForListTasks) {
  auto h = Haystack::from_text("The naïve Cat sat; cats, CATS and a dog-house. Extraordinarily", byte_tokenizer());
  ASSERT_TRUE(h.has_value());
  const auto& w = (*h)->words();
  // "The", "Cat", "dog": 3 letters; "Extraordinarily": 15; "naïve" is not an ASCII word.
  EXPECT_EQ(w, (std::vector<std::string>{"cats", "house"}));
}

}  // namespace
}  // namespace adakv::eval
