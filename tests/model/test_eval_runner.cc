// The task-accuracy runner (engine/eval_runner.h) on the shipped adakv-tiny-v1 with short
// needle prompts: the sweep's shape (rows per sample x config x protocol, CSV), that the
// protocols really differ in what the compressor sees, that a budget above the prompt length
// leaves every policy's greedy generation exactly equal to the full cache's, and the CLI's
// one-line errors (skipped while `adakv eval` does not list the task kinds).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/eval_runner.h"
#include "eval/haystack.h"
#include "eval/tasks.h"
#include "run_adakv.h"
#include "tiny_eval_fixture.h"

namespace adakv {
namespace {

namespace fs = std::filesystem;

CompressConfig config_of(KvPolicy p, int32_t budget) {
  CompressConfig c;
  c.policy = p;
  c.budget = budget;
  return c;
}

std::vector<EvalItem> needle_items(const std::vector<int>& lengths, const std::vector<double>& depths) {
  std::vector<EvalItem> items;
  const auto grid = eval::niah_grid(lengths, depths, 1);
  for (size_t c = 0; c < grid.size(); ++c) {
    eval::TaskOptions o;
    o.target_tokens = grid[c].target_tokens;
    o.depth = grid[c].depth;
    auto s = eval::make_task_sample(*tiny_eval_fixture().haystack, eval::Task::kNiah, o, /*seed=*/7, c);
    EXPECT_TRUE(s.has_value()) << s.status().message();
    items.push_back({std::move(s).value(), grid[c].target_tokens, grid[c].depth, grid[c].trial});
  }
  return items;
}

// The prediction's pass key is right iff it starts (after spaces) with the key: the pass-key
// metric, derived by hand rather than through eval::score.
double hand_passkey(const std::string& prediction, const std::string& key) {
  size_t i = prediction.find_first_of("0123456789");
  if (i == std::string::npos) return 0.0;
  size_t j = prediction.find_first_not_of("0123456789", i);
  return prediction.substr(i, j == std::string::npos ? std::string::npos : j - i) == key ? 1.0 : 0.0;
}

TEST(EvalRunner, NeedleSweepShapeAndProtocols) {
  TinyEvalFixture& f = tiny_eval_fixture();
  const EvalRunner runner(*f.model, f.tokenizer);
  const std::vector<EvalItem> items = needle_items({512}, {0.25, 0.75});
  const std::vector<EvalConfig> configs = {{"snapkv", 64, config_of(KvPolicy::kSnapKv, 64)},
                                           {"ada-snapkv", 64, config_of(KvPolicy::kAdaSnapKv, 64)}};
  const std::vector<EvalProtocol> protocols = {EvalProtocol::kInside, EvalProtocol::kAfter};
  std::vector<EvalRow> rows;
  int ticks = 0;
  for (const EvalItem& item : items) {
    auto r = runner.run(item, configs, protocols, [&] { ++ticks; });
    ASSERT_TRUE(r.has_value()) << r.status().message();
    rows.insert(rows.end(), r->begin(), r->end());
  }
  ASSERT_EQ(rows.size(), 2u * 2u * 2u);
  EXPECT_EQ(ticks, 8);
  for (size_t i = 0; i < rows.size(); ++i) {
    const EvalRow& r = rows[i];
    const EvalItem& item = items[i / 4];
    EXPECT_EQ(r.policy, configs[(i / 2) % 2].policy);
    EXPECT_EQ(r.protocol, protocols[i % 2]);
    EXPECT_GE(r.score, 0.0);
    EXPECT_LE(r.score, 1.0);
    EXPECT_EQ(r.score, hand_passkey(r.prediction, item.sample.answers[0])) << r.prediction;
    EXPECT_LE(r.prompt_tokens, 512);
    EXPECT_GT(r.question_tokens, 3);
    // 64 of ~500 entries per row: the cache really was compressed, in both protocols (in
    // protocol after, the question's entries are appended in full to the 64 kept).
    EXPECT_LT(r.kept_fraction, 0.3) << r.policy << " " << eval_protocol_name(r.protocol);
  }
  // CSV: header + one line per row (predictions are short digit strings, no embedded newlines).
  const std::string csv = eval_rows_csv(rows);
  std::istringstream in(csv);
  std::string line;
  int lines = 0;
  std::getline(in, line);
  EXPECT_EQ(line.rfind("task,id,length,depth,sample,policy,budget,protocol", 0), 0u);
  while (std::getline(in, line)) ++lines;
  EXPECT_EQ(lines, 8);
  EXPECT_NE(eval_summary_table(rows).find("ada-snapkv"), std::string::npos);
}

TEST(EvalRunner, BudgetAbovePromptMatchesFull) {
  TinyEvalFixture& f = tiny_eval_fixture();
  const EvalRunner runner(*f.model, f.tokenizer);
  const std::vector<EvalItem> items = needle_items({384}, {0.5});
  // Above prompt + generated tokens, so neither the prefill nor a continual policy evicts.
  const int32_t b = 1024;
  std::vector<EvalConfig> configs = {{"full", 0, config_of(KvPolicy::kFull, 0)}};
  for (KvPolicy p : {KvPolicy::kStreamingLlm, KvPolicy::kH2o, KvPolicy::kSnapKv, KvPolicy::kAdaSnapKv,
                     KvPolicy::kPyramidKv, KvPolicy::kAdaPyramidKv, KvPolicy::kCriticalKv, KvPolicy::kKvCompress}) {
    configs.push_back({kv_policy_name(p), b, config_of(p, b)});
  }
  const std::vector<EvalProtocol> protocols = {EvalProtocol::kInside, EvalProtocol::kAfter};
  auto rows = runner.run(items[0], configs, protocols);
  ASSERT_TRUE(rows.has_value()) << rows.status().message();
  ASSERT_EQ(rows->size(), configs.size() * 2);
  for (size_t i = 2; i < rows->size(); ++i) {
    const EvalRow& full = (*rows)[i % 2];
    const EvalRow& r = (*rows)[i];
    EXPECT_EQ(r.prediction, full.prediction) << r.policy << " " << eval_protocol_name(r.protocol);
    EXPECT_EQ(r.score, full.score) << r.policy;
    EXPECT_EQ(r.kept_fraction, 1.0) << r.policy;
  }
}

// --- the CLI ---

using test::read_file;
using test::run_adakv;
using test::RunResult;

bool cli_has_task_kinds() { return run_adakv("eval needle --help").exit_code == 0; }

TEST(EvalRunnerCli, MalformedJsonlNamesFileAndLine) {
  if (!cli_has_task_kinds()) GTEST_SKIP() << "adakv eval does not register needle/ruler/longbench/kvpress yet";
  const fs::path p = fs::temp_directory_path() / ("adakv_bad_" + std::to_string(::getpid()) + ".jsonl");
  {
    std::ofstream f(p);
    f << R"({"context": "a b c", "question": "q?", "answer": "x"})" << "\n";
    f << R"({"context": "a b c", "question": )" << "\n";
  }
  const RunResult r = run_adakv("eval kvpress --model '" + kTinyModelDir + "' --data '" + p.string() + "'");
  fs::remove(p);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find(p.string() + ":2"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(EvalRunnerCli, BadPolicyAndBudgetAreOneLineErrors) {
  if (!cli_has_task_kinds()) GTEST_SKIP() << "adakv eval does not register needle/ruler/longbench/kvpress yet";
  RunResult r = run_adakv("eval needle --model '" + kTinyModelDir + "' --policies snapkv,nope --lengths 256");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("nope"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  r = run_adakv("eval needle --model '" + kTinyModelDir + "' --policies snapkv --budgets 100000 --lengths 256");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("100000"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(EvalRunnerCli, PromptOverTheContextIsRefusedBeforeTheSweep) {
  if (!cli_has_task_kinds()) GTEST_SKIP() << "adakv eval does not register needle/ruler/longbench/kvpress yet";
  // adakv-tiny-v1's context is 8192: an 8192-token needle leaves no room for its answer. The
  // 256-token length first in the list would otherwise run (and write rows) before the failure.
  const fs::path prefix = fs::temp_directory_path() / ("adakv_needle_long_" + std::to_string(::getpid()));
  const RunResult r = run_adakv("eval needle --model '" + kTinyModelDir + "' --haystack '" + kHaystackFile +
                                "' --policies full --lengths 256,8192 --depths 0.5 --out '" + prefix.string() + "'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("exceeds the model's context of 8192"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("at most 8160"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("runs"), std::string::npos) << "no run may start: " << r.err;
  EXPECT_FALSE(fs::exists(prefix.string() + ".csv"));
}

TEST(EvalRunnerCli, NeedleSweepWritesCsvAndJson) {
  if (!cli_has_task_kinds()) GTEST_SKIP() << "adakv eval does not register needle/ruler/longbench/kvpress yet";
  const fs::path prefix = fs::temp_directory_path() / ("adakv_needle_" + std::to_string(::getpid()));
  const RunResult r = run_adakv("eval needle --model '" + kTinyModelDir + "' --haystack '" + kHaystackFile +
                                "' --policies full,snapkv,ada-snapkv --budgets 64 --protocol both --lengths 256 "
                                "--depths 0.5 --samples 1 --out '" + prefix.string() + "'");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string csv = read_file(prefix.string() + ".csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 1 + 3 * 2);  // header + (full, 2 policies) x 2 protocols
  const std::string json = read_file(prefix.string() + ".json");
  EXPECT_NE(json.find("\"aggregates\""), std::string::npos);
  EXPECT_NE(r.out.find("ada-snapkv"), std::string::npos);
  EXPECT_NE(r.err.find("6/6 runs"), std::string::npos) << r.err;
  fs::remove(prefix.string() + ".csv");
  fs::remove(prefix.string() + ".json");
}

}  // namespace
}  // namespace adakv
