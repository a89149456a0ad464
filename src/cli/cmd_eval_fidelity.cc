// adakv eval fidelity: for each policy and budget, the relative L1 error of every layer's
// attention output against the full cache and the agreement of teacher-forced next-token
// argmax predictions (engine/fidelity.h); a table on stdout, optionally a CSV.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/kv_flags.h"
#include "core/mapped_file.h"
#include "engine/fidelity.h"
#include "io/tokenizer.h"
#include "model/transformer.h"

namespace adakv::cli {
namespace {

struct FidelityArgs {
  std::string model_dir;
  std::string text_file;
  std::string policies;
  std::string budgets;
  int64_t length = 2048;
  int64_t forced = 64;
  std::string csv;
  KvFlags kv;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

void run_fidelity(const FidelityArgs& args) {
  const std::vector<std::string> policies = split(args.policies);
  std::vector<int64_t> budgets;
  for (const std::string& b : split(args.budgets)) {
    try {
      size_t used = 0;
      budgets.push_back(std::stoll(b, &used));
      if (used != b.size()) throw std::invalid_argument(b);
    } catch (const std::exception&) {
      fail(invalid_argument("--budgets: '" + b + "' is not an integer"));
    }
  }
  if (policies.empty() || budgets.empty()) fail(invalid_argument("--policies and --budgets need at least one value"));
  std::vector<CompressConfig> configs;  // [policies x budgets], validated before any work
  for (const std::string& p : policies)
    for (int64_t b : budgets) configs.push_back(kv_config_or_fail(args.kv, p, b));

  std::unique_ptr<Transformer> model = value_or_fail(Transformer::load(args.model_dir));
  std::shared_ptr<Tokenizer> tokenizer = value_or_fail(Tokenizer::load(args.model_dir));
  const std::string text = value_or_fail(read_text_file(args.text_file));
  const std::vector<int32_t> tokens = tokenizer->encode(text, /*add_special=*/true);
  FidelityOptions options;
  options.prompt_length = args.length;
  options.forced_tokens = args.forced;
  std::fprintf(stderr, "adakv: fidelity: full cache, %lld + %lld tokens...\n", static_cast<long long>(args.length),
               static_cast<long long>(args.forced));
  const FidelityRunner runner = value_or_fail(FidelityRunner::create(*model, tokens, options));

  const int64_t layers = model->config().num_layers;
  std::string csv = "policy,budget,kept_fraction,mean_rel_l1,argmax_agreement";
  for (int64_t l = 0; l < layers; ++l) csv += ",rel_l1_layer" + std::to_string(l);
  csv += "\n";
  std::printf("%-16s %7s %7s %12s %9s  per-layer relative L1\n", "policy", "budget", "kept", "mean rel L1", "argmax");
  for (size_t i = 0; i < configs.size(); ++i) {
    const CompressConfig& c = configs[i];
    std::fprintf(stderr, "\radakv: fidelity [%zu/%zu] %s budget %d...   ", i + 1, configs.size(), kv_policy_name(c.policy),
                 c.budget);
    std::fflush(stderr);
    const FidelityResult r = value_or_fail(runner.run(c));
    std::printf("%-16s %7d %7.3f %12.5f %9.4f ", kv_policy_name(c.policy), c.budget, r.kept_fraction, r.mean_rel_l1,
                r.argmax_agreement);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s,%d,%.6f,%.6f,%.6f", kv_policy_name(c.policy), c.budget, r.kept_fraction,
                  r.mean_rel_l1, r.argmax_agreement);
    csv += buf;
    for (double e : r.layer_rel_l1) {
      std::printf(" %.4f", e);
      std::snprintf(buf, sizeof buf, ",%.6f", e);
      csv += buf;
    }
    std::printf("\n");
    std::fflush(stdout);
    csv += "\n";
  }
  std::fprintf(stderr, "\n");
  if (!args.csv.empty()) {
    std::ofstream out(args.csv);
    out << csv;
    if (!out) fail(internal_error(args.csv + ": cannot write the CSV"));
  }
}

}  // namespace

void register_eval_fidelity(CLI::App& eval) {
  auto args = std::make_shared<FidelityArgs>();
  CLI::App* cmd = eval.add_subcommand("fidelity", "Attention-output error and argmax agreement of compressed caches");
  cmd->add_option("--model", args->model_dir, "Hugging Face checkpoint folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--text", args->text_file, "Text whose prefix is the prompt")->required()->check(CLI::ExistingFile);
  cmd->add_option("--policies", args->policies, "Comma-separated policies: " + kv_policy_names())->required();
  cmd->add_option("--budgets", args->budgets, "Comma-separated budgets (per kv head, window included)")->required();
  cmd->add_option("--length", args->length, "Prompt tokens N")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--forced", args->forced, "Teacher-forced tokens M after the prompt")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--csv", args->csv, "Write the results as CSV");
  add_kv_flags(cmd, args->kv, /*with_policy=*/false);
  cmd->callback([args] { run_fidelity(*args); });
}

}  // namespace adakv::cli
