// The shipped adakv-tiny-v1 with its tokenizer and the held-out haystack, loaded once per test
// binary (tests/model/test_eval_*.cc).
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <string_view>

#include "eval/haystack.h"
#include "io/tokenizer.h"
#include "model/transformer.h"

namespace adakv {

inline const std::string kTinyModelDir = std::string(ADAKV_SOURCE_DIR) + "/models/adakv-tiny-v1";
inline const std::string kHaystackFile = std::string(ADAKV_SOURCE_DIR) + "/data/haystack/validation.txt";

struct TinyEvalFixture {
  std::unique_ptr<Transformer> model;
  std::shared_ptr<Tokenizer> tokenizer;
  std::shared_ptr<const eval::Haystack> haystack;
};

inline TinyEvalFixture& tiny_eval_fixture() {
  static TinyEvalFixture f = [] {
    TinyEvalFixture x;
    auto m = Transformer::load(kTinyModelDir);
    EXPECT_TRUE(m.has_value()) << m.status().message();
    x.model = std::move(m).value();
    auto t = Tokenizer::load(kTinyModelDir);
    EXPECT_TRUE(t.has_value());
    x.tokenizer = std::move(t).value();
    std::shared_ptr<const Tokenizer> tok = x.tokenizer;
    auto h = eval::Haystack::load(kHaystackFile, [tok](std::string_view s) { return tok->encode(s, true); });
    EXPECT_TRUE(h.has_value());
    x.haystack = std::move(h).value();
    return x;
  }();
  return f;
}

}  // namespace adakv
