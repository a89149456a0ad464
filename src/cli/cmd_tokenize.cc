// adakv tokenize: prints the token ids of TEXT (space-separated, one line), as transformers'
// tokenizer gives them with add_special_tokens (BOS etc.) unless --no-special.
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "io/tokenizer.h"

namespace adakv::cli {
namespace {

struct TokenizeArgs {
  std::string model_dir;
  std::string text;
  bool no_special = false;
};

void run_tokenize(const TokenizeArgs& args) {
  std::shared_ptr<Tokenizer> tokenizer = value_or_fail(Tokenizer::load(args.model_dir));
  std::string line;
  for (int32_t id : tokenizer->encode(args.text, /*add_special=*/!args.no_special)) {
    if (!line.empty()) line += ' ';
    line += std::to_string(id);
  }
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
}

}  // namespace

void register_tokenize(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Print the token ids of TEXT");
  cmd->add_option("--model", args->model_dir, "Hugging Face model directory (tokenizer.json)")->required();
  cmd->add_option("text", args->text, "Text to tokenize")->required();
  cmd->add_flag("--no-special", args->no_special, "Do not add special tokens (BOS)");
  cmd->callback([args] { run_tokenize(*args); });
}

}  // namespace adakv::cli
