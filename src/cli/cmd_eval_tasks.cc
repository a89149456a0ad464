// adakv eval needle | ruler | longbench | kvpress: task-accuracy sweeps over policies x budgets
// and both protocols (engine/eval_runner.h). Each writes PREFIX.csv (one row per sample, config
// and protocol) and PREFIX.json (aggregates) with --out, draws a progress bar on stderr and
// prints the mean score per policy x budget and protocol on stdout at the end.
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/kv_flags.h"
#include "engine/eval_runner.h"
#include "engine/generator.h"
#include "eval/haystack.h"
#include "eval/longbench.h"
#include "eval/tasks.h"
#include "io/tokenizer.h"
#include "model/transformer.h"

namespace adakv::cli {

namespace {

enum class Kind { kNeedle, kRuler, kLongBench, kKvpress };

struct TaskArgs {
  Kind kind = Kind::kNeedle;
  std::string model_dir;
  std::string policies = "full,snapkv,ada-snapkv";
  std::string budgets = "128";
  std::string protocol = "both";
  int64_t samples = 1;
  uint64_t seed = 0;
  std::string out;
  bool chat = false;
  KvFlags kv;
  // needle / ruler
  std::string haystack = "data/haystack/validation.txt";
  std::string lengths = "1024,2048,4096";
  std::string depths = "0,0.25,0.5,0.75,1";
  int64_t num_depths = 0;
  std::string tasks;
  // longbench / kvpress
  std::string data;
  int64_t max_length = 0;
  int64_t max_new_tokens = 64;
  std::string shard;  // "I/N": run items I, I+N, I+2N, ... (parallel sweeps in separate processes)
  bool no_share_prefill = false;
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kNeedle: return "needle";
    case Kind::kRuler: return "ruler";
    case Kind::kLongBench: return "longbench";
    case Kind::kKvpress: return "kvpress";
  }
  return "?";
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

std::vector<int64_t> parse_ints(const char* flag, const std::string& s) {
  std::vector<int64_t> out;
  for (const std::string& x : split(s)) {
    try {
      size_t used = 0;
      out.push_back(std::stoll(x, &used));
      if (used != x.size()) throw std::invalid_argument(x);
    } catch (const std::exception&) {
      fail(invalid_argument(std::string("--") + flag + ": '" + x + "' is not an integer"));
    }
  }
  if (out.empty()) fail(invalid_argument(std::string("--") + flag + " needs at least one value"));
  return out;
}

std::vector<double> parse_depths(const std::string& s) {
  std::vector<double> out;
  for (const std::string& x : split(s)) {
    double d = -1;
    try {
      size_t used = 0;
      d = std::stod(x, &used);
      if (used != x.size()) throw std::invalid_argument(x);
    } catch (const std::exception&) {
      fail(invalid_argument("--depths: '" + x + "' is not a number"));
    }
    if (!(d >= 0.0 && d <= 1.0)) fail(out_of_range("--depths: " + x + " is out of range: allowed [0, 1]"));
    out.push_back(d);
  }
  if (out.empty()) fail(invalid_argument("--depths needs at least one value"));
  return out;
}

// The sweep's configs, validated before any work: full once, every other policy per budget.
std::vector<EvalConfig> sweep_configs(const TaskArgs& args, int64_t context_length) {
  const std::vector<std::string> policies = split(args.policies);
  if (policies.empty()) fail(invalid_argument("--policies needs at least one value"));
  const std::vector<int64_t> budgets = parse_ints("budgets", args.budgets);
  std::vector<EvalConfig> configs;
  for (const std::string& p : policies) {
    const KvPolicy policy = value_or_fail(parse_kv_policy(p));
    if (!policy_compresses(policy)) {
      configs.push_back({p, 0, kv_config_or_fail(args.kv, p, 0)});
      continue;
    }
    for (int64_t b : budgets) {
      if (b > context_length) {
        fail(out_of_range("--budgets: " + std::to_string(b) + " is out of range: allowed at most the model's context of " +
                          std::to_string(context_length)));
      }
      configs.push_back({p, b, kv_config_or_fail(args.kv, p, b)});
    }
  }
  return configs;
}

std::vector<EvalItem> synthetic_items(const TaskArgs& args, const EvalRunner& runner) {
  const std::shared_ptr<const eval::Haystack> haystack =
      value_or_fail(eval::Haystack::load(args.haystack, runner.tokenize_fn()));
  std::vector<int> lengths;
  for (int64_t l : parse_ints("lengths", args.lengths)) {
    if (l <= 0 || l > 1'000'000) fail(out_of_range("--lengths: " + std::to_string(l) + " is out of range"));
    lengths.push_back(static_cast<int>(l));
  }
  eval::TaskOptions base;
  base.format = args.chat ? eval::PromptFormat::tiny_chat() : eval::PromptFormat::raw();
  std::vector<EvalItem> items;
  if (args.kind == Kind::kNeedle) {
    const std::vector<double> depths =
        args.num_depths > 0 ? eval::even_depths(static_cast<int>(args.num_depths)) : parse_depths(args.depths);
    const std::vector<eval::NiahCell> grid = eval::niah_grid(lengths, depths, static_cast<int>(args.samples));
    for (size_t c = 0; c < grid.size(); ++c) {
      eval::TaskOptions o = base;
      o.target_tokens = grid[c].target_tokens;
      o.depth = grid[c].depth;
      EvalItem item;
      item.sample = value_or_fail(eval::make_task_sample(*haystack, eval::Task::kNiah, o, args.seed, c));
      item.length = grid[c].target_tokens;
      item.depth = grid[c].depth;
      item.index = grid[c].trial;
      items.push_back(std::move(item));
    }
    return items;
  }
  std::vector<eval::Task> tasks;
  if (args.tasks.empty()) {
    tasks = eval::ruler_tasks();
  } else {
    for (const std::string& t : split(args.tasks)) tasks.push_back(value_or_fail(eval::parse_task(t)));
  }
  for (eval::Task t : tasks) {
    for (int len : lengths) {
      for (int64_t i = 0; i < args.samples; ++i) {
        eval::TaskOptions o = base;
        o.target_tokens = len;
        EvalItem item;
        item.sample = value_or_fail(eval::make_task_sample(*haystack, t, o, args.seed, static_cast<uint64_t>(i)));
        item.length = len;
        item.index = i;
        items.push_back(std::move(item));
      }
    }
  }
  return items;
}

std::vector<EvalItem> file_items(const TaskArgs& args) {
  const eval::PromptFormat format = args.chat ? eval::PromptFormat::tiny_chat() : eval::PromptFormat::raw();
  std::vector<eval::Sample> samples;
  if (args.kind == Kind::kLongBench) {
    for (const eval::LongBenchRecord& r : value_or_fail(eval::read_longbench_jsonl(args.data))) {
      samples.push_back(value_or_fail(eval::longbench_sample(r, format)));
    }
  } else {
    for (const eval::KvpressRecord& r : value_or_fail(eval::read_kvpress_jsonl(args.data))) {
      samples.push_back(eval::kvpress_sample(r, format, static_cast<int>(args.max_new_tokens)));
    }
  }
  if (samples.empty()) fail(invalid_argument(args.data + ": no samples"));
  std::vector<EvalItem> items;
  for (size_t i = 0; i < samples.size(); ++i) {
    if (args.samples > 0 && static_cast<int64_t>(i) >= args.samples) break;
    EvalItem item;
    item.sample = std::move(samples[i]);
    item.index = static_cast<int64_t>(i);
    items.push_back(std::move(item));
  }
  return items;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) fail(internal_error(path + ": cannot write"));
}

void run_tasks(const TaskArgs& args) {
  const std::vector<EvalProtocol> protocols = value_or_fail(parse_eval_protocols(args.protocol));
  if (args.samples < 0) fail(out_of_range("--samples must be >= 0"));
  if ((args.kind == Kind::kLongBench || args.kind == Kind::kKvpress) && !std::filesystem::is_regular_file(args.data)) {
    fail(not_found(args.data + ": no such file"));
  }
  if (!std::filesystem::is_directory(args.model_dir)) fail(not_found(args.model_dir + ": no such model directory"));
  std::unique_ptr<Transformer> model = value_or_fail(Transformer::load(args.model_dir));
  const std::vector<EvalConfig> configs = sweep_configs(args, model->context_length());
  std::shared_ptr<Tokenizer> tokenizer = value_or_fail(Tokenizer::load(args.model_dir));
  EvalRunOptions options;
  options.max_length = args.max_length;
  options.share_prefill = !args.no_share_prefill;
  const EvalRunner runner(*model, tokenizer, options);

  std::vector<EvalItem> items =
      (args.kind == Kind::kNeedle || args.kind == Kind::kRuler) ? synthetic_items(args, runner) : file_items(args);
  if (!args.shard.empty()) {
    int64_t index = -1, count = 0;
    char tail = 0;
    if (std::sscanf(args.shard.c_str(), "%" SCNd64 "/%" SCNd64 "%c", &index, &count, &tail) != 2 || count < 1 ||
        index < 0 || index >= count) {
      fail(invalid_argument("--shard must be I/N with 0 <= I < N, got '" + args.shard + "'"));
    }
    std::vector<EvalItem> mine;
    for (size_t i = static_cast<size_t>(index); i < items.size(); i += static_cast<size_t>(count)) {
      mine.push_back(std::move(items[i]));
    }
    items = std::move(mine);
  }
  // A synthetic prompt that cannot fit the context with its answer would fail mid-sweep, after
  // hours of other samples: refuse the sweep before the first run instead.
  for (const EvalItem& item : items) {
    const eval::Sample& s = item.sample;
    if (s.prompt_tokens <= 0) continue;
    const Status fits = check_fits_context(s.prompt_tokens, s.max_new_tokens, model->context_length());
    if (!fits.is_ok()) {
      fail(Status(fits.code(), "sample " + s.id + ": " + fits.message() + " (ask for --lengths of at most " +
                                   std::to_string(model->context_length() - s.max_new_tokens) + ")"));
    }
  }
  const int64_t total = static_cast<int64_t>(items.size() * configs.size() * protocols.size());
  // Rows reach PREFIX.csv as each sample finishes, so a sweep that is stopped keeps what it did.
  std::ofstream csv;
  if (!args.out.empty()) {
    csv.open(args.out + ".csv", std::ios::binary | std::ios::trunc);
    csv << eval_csv_header() << std::flush;
    if (!csv) fail(internal_error(args.out + ".csv: cannot write"));
  }
  std::vector<EvalRow> rows;
  {
    ProgressBar bar(stderr, total, std::string("adakv eval ") + kind_name(args.kind));
    for (const EvalItem& item : items) {
      std::vector<EvalRow> r = value_or_fail(runner.run(item, configs, protocols, [&] { bar.tick(); }));
      if (csv.is_open()) {
        for (const EvalRow& row : r) csv << eval_csv_row(row);
        csv << std::flush;
        if (!csv) fail(internal_error(args.out + ".csv: cannot write"));
      }
      rows.insert(rows.end(), std::make_move_iterator(r.begin()), std::make_move_iterator(r.end()));
    }
    bar.finish();
  }

  std::printf("adakv eval %s: %zu samples, mean score (kept = cache fraction after prefill)\n", kind_name(args.kind),
              items.size());
  std::printf("%s", eval_summary_table(rows).c_str());
  std::fflush(stdout);
  if (!args.out.empty()) {
    nlohmann::json meta = {{"command", std::string("eval ") + kind_name(args.kind)},
                           {"date", utc_now()},
                           {"model", args.model_dir},
                           {"policies", args.policies},
                           {"budgets", args.budgets},
                           {"protocol", args.protocol},
                           {"samples", args.samples},
                           {"seed", args.seed},
                           {"chat", args.chat},
                           {"kv_window", args.kv.window},
                           {"items", items.size()}};
    if (!args.shard.empty()) meta["shard"] = args.shard;
    meta["share_prefill"] = !args.no_share_prefill;
    if (args.kind == Kind::kNeedle || args.kind == Kind::kRuler) meta["lengths"] = args.lengths;
    if (args.kind == Kind::kNeedle) meta["depths"] = args.num_depths > 0 ? std::to_string(args.num_depths) : args.depths;
    if (args.kind == Kind::kRuler) meta["tasks"] = args.tasks;
    if (!args.data.empty()) meta["data"] = args.data;
    write_file(args.out + ".json", eval_rows_json(rows, meta.dump()));
    std::fprintf(stderr, "adakv: wrote %s.csv and %s.json\n", args.out.c_str(), args.out.c_str());
  }
}

CLI::App* add_task_command(CLI::App& eval, Kind kind, const std::string& help, std::shared_ptr<TaskArgs> args) {
  args->kind = kind;
  CLI::App* cmd = eval.add_subcommand(kind_name(kind), help);
  cmd->add_option("--model", args->model_dir, "Hugging Face checkpoint folder")->required();
  cmd->add_option("--policies", args->policies, "Comma-separated policies: " + kv_policy_names())->capture_default_str();
  cmd->add_option("--budgets", args->budgets, "Comma-separated budgets (per kv head, window included; full runs once)")
      ->capture_default_str();
  cmd->add_option("--protocol", args->protocol, "Question inside the compressed prompt, appended after it, or both")
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the generated samples")->capture_default_str();
  cmd->add_option("--out", args->out, "Write PREFIX.csv (every run) and PREFIX.json (aggregates)");
  cmd->add_option("--shard", args->shard, "Run only items I, I+N, ... of the sweep (I/N), for parallel processes");
  cmd->add_flag("--chat", args->chat, "Wrap prompts in the chat template (adakv-tiny-v1's)");
  cmd->add_flag("--no-share-prefill", args->no_share_prefill,
                "Prefill every (policy, budget) run from scratch instead of sharing one full-cache prefill per "
                "sample and protocol (same results, slower; the reference path)");
  add_kv_flags(cmd, args->kv, /*with_policy=*/false);
  cmd->callback([args] { run_tasks(*args); });
  return cmd;
}

}  // namespace

void register_eval_tasks(CLI::App& eval) {
  {
    auto args = std::make_shared<TaskArgs>();
    CLI::App* cmd = add_task_command(eval, Kind::kNeedle, "Needle in a haystack: lengths x depths, pass-key accuracy", args);
    cmd->add_option("--samples", args->samples, "Samples per (length, depth) cell")->capture_default_str();
    cmd->add_option("--lengths", args->lengths, "Comma-separated prompt lengths in tokens")->capture_default_str();
    cmd->add_option("--depths", args->depths, "Comma-separated needle depths in [0, 1]")->capture_default_str();
    cmd->add_option("--num-depths", args->num_depths, "N depths evenly over [0, 1] (instead of --depths)");
    cmd->add_option("--haystack", args->haystack, "Haystack text")->capture_default_str();
  }
  {
    auto args = std::make_shared<TaskArgs>();
    args->lengths = "4096";
    CLI::App* cmd = add_task_command(eval, Kind::kRuler, "RULER-style synthetic tasks generated from a seed", args);
    cmd->add_option("--samples", args->samples, "Samples per (task, length)")->capture_default_str();
    cmd->add_option("--tasks", args->tasks, "Comma-separated tasks (default: all but niah)");
    cmd->add_option("--lengths", args->lengths, "Comma-separated prompt lengths in tokens")->capture_default_str();
    cmd->add_option("--haystack", args->haystack, "Haystack text")->capture_default_str();
  }
  {
    auto args = std::make_shared<TaskArgs>();
    args->samples = 0;
    CLI::App* cmd = add_task_command(eval, Kind::kLongBench, "LongBench-format JSONL, scored with each dataset's metric", args);
    cmd->add_option("--data", args->data, "LongBench JSONL file")->required();
    cmd->add_option("--samples", args->samples, "Use the first N records; 0 = all")->capture_default_str();
    cmd->add_option("--max-length", args->max_length, "Cut longer prompts in the middle to N tokens (0 = no cut)")
        ->capture_default_str();
  }
  {
    auto args = std::make_shared<TaskArgs>();
    args->samples = 0;
    CLI::App* cmd = add_task_command(eval, Kind::kKvpress, "kvpress-style context/question/answer JSONL", args);
    cmd->add_option("--data", args->data, "JSONL file")->required();
    cmd->add_option("--samples", args->samples, "Use the first N records; 0 = all")->capture_default_str();
    cmd->add_option("--max-length", args->max_length, "Cut longer prompts in the middle to N tokens (0 = no cut)")
        ->capture_default_str();
    cmd->add_option("--max-new-tokens", args->max_new_tokens, "Generation length of records that give none")
        ->capture_default_str();
  }
}

}  // namespace adakv::cli
