// adakv eval: the evaluation commands. Each kind is a sub-subcommand registered from its own file
// (cmd_eval_<kind>.cc) through a register_eval_<kind>(CLI::App& eval) declared in commands.h.
#include "cli/commands.h"

namespace adakv::cli {

void register_eval(CLI::App& app) {
  CLI::App* eval = app.add_subcommand("eval", "Evaluate the engine and the KV-cache policies");
  eval->require_subcommand(1);
  register_eval_fidelity(*eval);
  register_eval_tasks(*eval);
}

}  // namespace adakv::cli
