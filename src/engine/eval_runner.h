// Task-accuracy sweeps for `adakv eval needle|ruler|longbench|kvpress`: every sample is run
// with greedy decoding under each (policy, budget) of a sweep and each protocol, its generation
// scored with the sample's metric (eval/sample.h), and the rows written as CSV, aggregated as
// JSON and summarised as a table.
//
// Protocols (docs/quality.md, "Task accuracy"):
//   inside  the whole prompt (context + question) is prefilled with compression, then generation.
//   after   only the context part (prompt tokens before PromptTokens::question_start) is
//           prefilled with compression; the question part (question + answer prefix) is
//           appended to the compressed cache in one step (GenerateOptions::context), then
//           generation. The question never influences which entries were kept.
// The full policy runs once per protocol (its budget is reported as 0).
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "compress/compress_config.h"
#include "core/status.h"
#include "eval/sample.h"
#include "io/tokenizer.h"
#include "model/transformer.h"

namespace adakv {

enum class EvalProtocol { kInside, kAfter };
const char* eval_protocol_name(EvalProtocol p);  // "inside" | "after"
// "inside" | "after" | "both".
Expected<std::vector<EvalProtocol>> parse_eval_protocols(std::string_view text);

// One sample and where it sits in the sweep's grid.
struct EvalItem {
  eval::Sample sample;
  int64_t length = 0;   // the requested prompt length (synthetic) or 0 (files)
  double depth = -1;    // needle depth asked for, < 0 when the task has none
  int64_t index = 0;    // sample number within its (task, length, depth) cell
};

// One (policy, budget) of a sweep; `name` is what the tables show.
struct EvalConfig {
  std::string policy;
  int64_t budget = 0;  // 0 for full
  CompressConfig compress;
};

struct EvalRow {
  std::string task;
  std::string id;
  int64_t length = 0;
  double depth = -1;
  int64_t index = 0;
  std::string policy;
  int64_t budget = 0;
  EvalProtocol protocol = EvalProtocol::kInside;
  int64_t prompt_tokens = 0;    // the whole prompt (BOS included, after any truncation)
  int64_t question_tokens = 0;  // the part appended after compression in protocol after
  double kept_fraction = 1.0;   // cache entries kept after the prefill / what full holds
  double score = 0.0;           // in [0, 1]
  double seconds = 0.0;         // this run's time; with a shared prefill, the prefill's time is
                                // split evenly over the configs that share it
  std::string prediction;       // generated text, special tokens removed (cut at a newline
                                // for samples that stop at one)
};

struct EvalRunOptions {
  int64_t max_length = 0;  // > 0: prompts longer than this are cut in the middle (LongBench)
  // One full-cache prefill per (sample, protocol), shared by every config: each config copies
  // the cache and replays its compressor's prefill hooks (engine/prefill_snapshot.h), then
  // decodes. Each layer's compression scores are computed once per (sample, protocol, layer,
  // score_key) and reused across budgets and policies that score alike (the run that computes
  // them carries their time in `seconds`). Gives the same rows (bar `seconds`) as running every
  // config from scratch with generate(), which `false` does (the reference; `--no-share-prefill`).
  bool share_prefill = true;
};

// Runs samples against a loaded model; one instance per sweep.
class EvalRunner {
 public:
  EvalRunner(const Transformer& model, std::shared_ptr<const Tokenizer> tokenizer, EvalRunOptions options = {});

  // Every config x protocol for one item, in that order (configs outer). Fails when a prompt does
  // not fit the model's context with the sample's max_new_tokens.
  Expected<std::vector<EvalRow>> run(const EvalItem& item, const std::vector<EvalConfig>& configs,
                                     const std::vector<EvalProtocol>& protocols,
                                     const std::function<void()>& on_run_done = {}) const;

  // The tokenizer's encoder with BOS, as the task generators need it.
  eval::TokenizeFn tokenize_fn() const;

 private:
  struct OProjCache;
  // The fp32 o_proj of every layer, loaded once (two-stage policies, shared prefill only).
  Expected<std::shared_ptr<const std::vector<std::vector<float>>>> o_proj() const;

  const Transformer& model_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  EvalRunOptions options_;
  std::vector<int32_t> eos_ids_;
  std::shared_ptr<OProjCache> o_proj_cache_;
};

// CSV of the rows (header first); text fields quoted as RFC 4180. The header and single rows
// separately, for writers that append rows as runs finish.
std::string eval_rows_csv(const std::vector<EvalRow>& rows);
std::string eval_csv_header();
std::string eval_csv_row(const EvalRow& row);
// {"meta": meta, "aggregates": [{task, policy, budget, protocol, n, mean_score, mean_kept}...],
//  "overall": [{policy, budget, protocol, n, mean_score}...]} as text. `meta_json` must be a
// JSON object (the command line, date, model).
std::string eval_rows_json(const std::vector<EvalRow>& rows, const std::string& meta_json);
// Mean score per (policy, budget) row and protocol column, as a fixed-width text table.
std::string eval_summary_table(const std::vector<EvalRow>& rows);

// A one-line progress bar on a FILE (stderr): done / total runs, rate and ETA; redrawn with "\r".
class ProgressBar {
 public:
  ProgressBar(std::FILE* out, int64_t total, std::string label);
  void tick(int64_t n = 1);
  void finish();

 private:
  void draw();
  std::FILE* out_;
  int64_t total_;
  int64_t done_ = 0;
  std::string label_;
  double start_ = 0.0;
  double last_draw_ = -1.0;
};

}  // namespace adakv
