// The adakv program end to end: `adakv generate` on the fixtures prints exactly the text of
// transformers' greedy tokens (streamed through the tokenizer's StreamDecoder) and its speed
// summary on stderr; bad inputs exit non-zero with a single "adakv: error: ..." line.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "run_adakv.h"

namespace {

namespace fs = std::filesystem;

const fs::path kModelsDir = fs::path(ADAKV_FIXTURES_DIR) / "models";

using adakv::test::read_file;
using adakv::test::run_adakv;
using adakv::test::RunResult;
using adakv::test::shell_quote;

nlohmann::json reference(const std::string& name) {
  std::ifstream f(kModelsDir / name / "reference.json");
  return nlohmann::json::parse(f);
}

void expect_one_error_line(const RunResult& r, const std::string& needle) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.err.rfind("adakv: error: ", 0), 0u) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "more than one line: " << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
}

class GenerateCli : public ::testing::TestWithParam<std::string> {};

TEST_P(GenerateCli, GreedyOutputIsTheReferenceText) {
  const std::string name = GetParam();
  if (!fs::exists(kModelsDir / name / "reference.json")) GTEST_SKIP() << name << " fixture not generated";
  const nlohmann::json ref = reference(name);
  const RunResult r = run_adakv("generate --model " + shell_quote((kModelsDir / name).string()) + " --prompt " +
                                shell_quote(ref.at("prompt").get<std::string>()) + " -n 16 --ignore-eos");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, ref.at("greedy_text").get<std::string>() + "\n");
  EXPECT_NE(r.err.find("prompt: " + std::to_string(ref.at("prompt_ids").size()) + " tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("generated: 16 tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tokens/s"), std::string::npos) << r.err;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GenerateCli, ::testing::Values("llama2", "llama3", "mistral", "qwen2", "qwen3"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(GenerateCliEos, StopsAtTheEndToken) {
  // qwen2's second greedy token is its end token (<|endoftext|>), so without --ignore-eos the
  // program prints one token's text and stops.
  if (!fs::exists(kModelsDir / "qwen2" / "reference.json")) GTEST_SKIP() << "qwen2 fixture not generated";
  const nlohmann::json ref = reference("qwen2");
  const auto greedy = ref.at("greedy_ids").get<std::vector<int>>();
  ASSERT_EQ(greedy.at(1), 1997) << "fixture changed; pick another stop case";
  const RunResult r = run_adakv("generate --model " + shell_quote((kModelsDir / "qwen2").string()) + " --prompt " +
                                shell_quote(ref.at("prompt").get<std::string>()) + " -n 16");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("generated: 1 tokens (stopped at end token)"), std::string::npos) << r.err;
  EXPECT_FALSE(r.out.empty());
  EXPECT_EQ(ref.at("greedy_text").get<std::string>().rfind(r.out.substr(0, r.out.size() - 1), 0), 0u)
      << "the printed token is not the start of the greedy text: " << r.out;
}

TEST(GenerateCliErrors, MissingModelDirectory) {
  const RunResult r = run_adakv("generate --model /nonexistent/adakv_model --prompt hello");
  expect_one_error_line(r, "/nonexistent/adakv_model");
}

TEST(GenerateCliErrors, PromptPlusTokensBeyondTheContext) {
  if (!fs::exists(kModelsDir / "mistral" / "reference.json")) GTEST_SKIP() << "mistral fixture not generated";
  const RunResult r = run_adakv("generate --model " + shell_quote((kModelsDir / "mistral").string()) +
                                " --prompt 'The old man walked slowly down to the river.' -n 60");
  expect_one_error_line(r, "new tokens exceeds the model's context of 64");
}

TEST(GenerateCliErrors, SamplingValueOutOfRange) {
  if (!fs::exists(kModelsDir / "llama3" / "reference.json")) GTEST_SKIP() << "llama3 fixture not generated";
  const RunResult r = run_adakv("generate --model " + shell_quote((kModelsDir / "llama3").string()) +
                                " --prompt hello --temperature 0.7 --top-p 1.5");
  expect_one_error_line(r, "top-p must be in (0, 1]");
}

TEST(GenerateCliErrors, DirectoryWithoutConfig) {
  const fs::path tmp = fs::temp_directory_path() / ("adakv_cli_empty_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  const RunResult r = run_adakv("generate --model " + shell_quote(tmp.string()) + " --prompt hello");
  expect_one_error_line(r, "config.json");
  fs::remove_all(tmp);
}

TEST(GenerateCliSampling, SameSeedSameTextOtherSeedOther) {
  if (!fs::exists(kModelsDir / "llama3" / "reference.json")) GTEST_SKIP() << "llama3 fixture not generated";
  const std::string base = "generate --model " + shell_quote((kModelsDir / "llama3").string()) +
                           " --prompt 'Once upon a time' -n 24 --temperature 1.0 --top-k 40 --top-p 0.95 --ignore-eos";
  const RunResult a = run_adakv(base + " --seed 7");
  const RunResult b = run_adakv(base + " --seed 7");
  const RunResult c = run_adakv(base + " --seed 8");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);
}

}  // namespace
