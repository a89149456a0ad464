// The request checks every generating path shares (engine/generator.h): check_fits_context at
// the context's edge and with a max_new_tokens too large to add, and is_eos_token.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>

#include "engine/generator.h"

namespace adakv {
namespace {

TEST(GenerateLimits, FitsContextUpToTheLastToken) {
  EXPECT_TRUE(check_fits_context(7, 8185, 8192).is_ok());
  EXPECT_TRUE(check_fits_context(0, 8192, 8192).is_ok());
  EXPECT_TRUE(check_fits_context(8192, 0, 8192).is_ok());
  const Status over = check_fits_context(7, 8186, 8192);
  EXPECT_EQ(over.code(), StatusCode::kOutOfRange);
  EXPECT_EQ(over.message(), "prompt of 7 tokens + 8186 new tokens exceeds the model's context of 8192");
}

TEST(GenerateLimits, HugeMaxNewTokensDoesNotWrapAround) {
  // A request's max_tokens near INT64_MAX: prompt + max_new would overflow to a negative sum.
  const int64_t huge = std::numeric_limits<int64_t>::max();
  const Status s = check_fits_context(7, huge, 8192);
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_EQ(s.message(), "prompt of 7 tokens + " + std::to_string(huge) + " new tokens exceeds the model's context of 8192");
  EXPECT_EQ(check_fits_context(huge, 1, 8192).code(), StatusCode::kOutOfRange);
}

TEST(GenerateLimits, EosUnlessIgnored) {
  GenerateOptions o;
  o.eos_ids = {2, 128001};
  EXPECT_TRUE(is_eos_token(o, 2));
  EXPECT_TRUE(is_eos_token(o, 128001));
  EXPECT_FALSE(is_eos_token(o, 3));
  o.ignore_eos = true;
  EXPECT_FALSE(is_eos_token(o, 2));
}

}  // namespace
}  // namespace adakv
