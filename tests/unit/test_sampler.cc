// Sampler: greedy argmax, the exact masks of top-k and top-p against hand-computed sets and
// probabilities, temperature, a chi-square check of draw frequencies with a fixed seed, and
// determinism per seed.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

#include "engine/generator.h"
#include "engine/sampler.h"

namespace adakv {
namespace {

std::vector<float> log_probs(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

TEST(Sampler, GreedyIsArgmaxWithLowestIdOnTies) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(std::vector<float>{0.1f, 3.0f, -1.0f, 2.9f}), 1);
  EXPECT_EQ(s.sample(std::vector<float>{1.0f, 5.0f, 5.0f, 5.0f}), 1);
  EXPECT_EQ(s.sample(std::vector<float>{-INFINITY, -2.0f}), 1);
}

TEST(Sampler, TemperatureScalesLogitsBeforeSoftmax) {
  SamplingParams p;
  p.temperature = 0.5f;
  const std::vector<float> logits = {1.0f, 2.0f, 0.0f};
  const std::vector<double> d = Sampler(p).distribution(logits);
  // softmax([2, 4, 0]) by hand.
  const double z = std::exp(2.0) + std::exp(4.0) + 1.0;
  EXPECT_NEAR(d[0], std::exp(2.0) / z, 1e-6);
  EXPECT_NEAR(d[1], std::exp(4.0) / z, 1e-6);
  EXPECT_NEAR(d[2], 1.0 / z, 1e-6);
}

TEST(Sampler, TopKKeepsExactlyTheKLargestRenormalised) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  const std::vector<float> logits = {0.0f, 3.0f, 1.0f, 2.0f, -1.0f};
  const std::vector<double> d = Sampler(p).distribution(logits);
  const double z = std::exp(3.0) + std::exp(2.0);
  const std::vector<double> want = {0.0, std::exp(3.0) / z, 0.0, std::exp(2.0) / z, 0.0};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(d[i], want[i], 1e-9) << i;
}

TEST(Sampler, TopKKeepsTiesAtTheKthValue) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  const std::vector<double> d = Sampler(p).distribution(std::vector<float>{1.0f, 2.0f, 1.0f, 0.0f});
  EXPECT_GT(d[0], 0.0);
  EXPECT_GT(d[1], 0.0);
  EXPECT_GT(d[2], 0.0);
  EXPECT_EQ(d[3], 0.0);
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingTheMass) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order of ids).
  const std::vector<double> probs = {0.15, 0.5, 0.05, 0.3};
  const std::vector<float> logits = log_probs(probs);
  struct Case {
    float top_p;
    std::vector<bool> kept;
  };
  const std::vector<Case> cases = {
      {0.4f, {false, true, false, false}},   // 0.5 alone reaches 0.4
      {0.75f, {false, true, false, true}},   // 0.5 + 0.3
      {0.85f, {true, true, false, true}},    // 0.5 + 0.3 + 0.15
      {0.99f, {true, true, true, true}},
  };
  for (const Case& c : cases) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.top_p = c.top_p;
    const std::vector<double> d = Sampler(p).distribution(logits);
    double kept_mass = 0;
    for (size_t i = 0; i < probs.size(); ++i) kept_mass += c.kept[i] ? probs[i] : 0.0;
    for (size_t i = 0; i < probs.size(); ++i) {
      EXPECT_NEAR(d[i], c.kept[i] ? probs[i] / kept_mass : 0.0, 1e-6) << "top_p=" << c.top_p << " id=" << i;
    }
  }
}

TEST(Sampler, TopKThenTopPCompose) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 3;
  p.top_p = 0.6f;
  // Top-3 of {0.4, 0.3, 0.2, 0.1} renormalised: 0.4/0.9, 0.3/0.9, 0.2/0.9; top-p 0.6 keeps the
  // first two (0.444 < 0.6, then 0.778 >= 0.6).
  const std::vector<double> d = Sampler(p).distribution(log_probs({0.4, 0.3, 0.2, 0.1}));
  EXPECT_NEAR(d[0], 0.4 / 0.7, 1e-6);
  EXPECT_NEAR(d[1], 0.3 / 0.7, 1e-6);
  EXPECT_EQ(d[2], 0.0);
  EXPECT_EQ(d[3], 0.0);
}

TEST(Sampler, DrawFrequenciesFollowTheDistribution) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 1234;
  const std::vector<double> probs = {0.1, 0.2, 0.3, 0.4};
  const std::vector<float> logits = log_probs(probs);
  Sampler s(p);
  const int draws = 100000;
  std::vector<int> counts(probs.size());
  for (int i = 0; i < draws; ++i) ++counts[s.sample(logits)];
  double chi2 = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    const double expected = probs[i] * draws;
    chi2 += (counts[i] - expected) * (counts[i] - expected) / expected;
  }
  // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
  EXPECT_LT(chi2, 16.27) << counts[0] << " " << counts[1] << " " << counts[2] << " " << counts[3];
}

TEST(Sampler, MaskedTokensAreNeverDrawn) {
  SamplingParams p;
  p.temperature = 2.0f;
  p.top_k = 2;
  p.seed = 7;
  Sampler s(p);
  const std::vector<float> logits = {0.0f, 1.0f, 0.9f, 0.95f};
  for (int i = 0; i < 5000; ++i) {
    const int32_t id = s.sample(logits);
    EXPECT_TRUE(id == 1 || id == 3) << id;
  }
}

TEST(Sampler, SameSeedSameSequenceDifferentSeedDifferent) {
  SamplingParams p;
  p.temperature = 1.0f;
  const std::vector<float> logits(50, 0.0f);  // uniform over 50 ids
  auto run = [&](uint64_t seed) {
    p.seed = seed;
    Sampler s(p);
    std::vector<int32_t> ids;
    for (int i = 0; i < 64; ++i) ids.push_back(s.sample(logits));
    return ids;
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
}

TEST(Sampler, ValidateRejectsOutOfRangeValues) {
  SamplingParams p;
  EXPECT_TRUE(validate_sampling(p).is_ok());
  p.temperature = -0.1f;
  EXPECT_FALSE(validate_sampling(p).is_ok());
  p = SamplingParams{};
  p.top_p = 0.0f;
  EXPECT_FALSE(validate_sampling(p).is_ok());
  p.top_p = 1.5f;
  EXPECT_FALSE(validate_sampling(p).is_ok());
  p = SamplingParams{};
  p.top_k = -1;
  EXPECT_FALSE(validate_sampling(p).is_ok());
}

// generation_config.json -> defaults, as transformers reads it.
class SamplingDefaults : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("adakv_gencfg_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void write(const std::string& text) { std::ofstream(dir_ / "generation_config.json") << text; }
  std::filesystem::path dir_;
};

TEST_F(SamplingDefaults, AbsentFileIsGreedy) {
  auto p = load_sampling_defaults(dir_.string());
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->temperature, 0.0f);
}

TEST_F(SamplingDefaults, DoSampleTakesTheFileValues) {
  write(R"({"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "eos_token_id": [1, 2]})");
  auto p = load_sampling_defaults(dir_.string());
  ASSERT_TRUE(p.has_value()) << p.status().message();
  EXPECT_FLOAT_EQ(p->temperature, 0.6f);
  EXPECT_FLOAT_EQ(p->top_p, 0.9f);
  EXPECT_EQ(p->top_k, 20);
}

TEST_F(SamplingDefaults, DoSampleWithoutValuesUsesTransformersDefaults) {
  write(R"({"do_sample": true})");
  auto p = load_sampling_defaults(dir_.string());
  ASSERT_TRUE(p.has_value());
  EXPECT_FLOAT_EQ(p->temperature, 1.0f);
  EXPECT_FLOAT_EQ(p->top_p, 1.0f);
  EXPECT_EQ(p->top_k, 50);
}

TEST_F(SamplingDefaults, NoDoSampleIsGreedyEvenWithATemperature) {
  write(R"({"temperature": 0.7, "top_p": 0.8})");
  auto p = load_sampling_defaults(dir_.string());
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->temperature, 0.0f);
  EXPECT_FLOAT_EQ(p->top_p, 0.8f);  // kept for a --temperature given on the command line
}

TEST_F(SamplingDefaults, MalformedFileIsAnErrorNamingIt) {
  write("{not json");
  auto p = load_sampling_defaults(dir_.string());
  ASSERT_FALSE(p.has_value());
  EXPECT_NE(p.status().message().find("generation_config.json"), std::string::npos);
  write(R"({"do_sample": true, "top_p": 3})");
  p = load_sampling_defaults(dir_.string());
  ASSERT_FALSE(p.has_value());
  EXPECT_NE(p.status().message().find("top-p"), std::string::npos) << p.status().message();
}

}  // namespace
}  // namespace adakv
