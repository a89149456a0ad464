// Subcommands of the adakv program; each file cmd_<name>.cc defines one register function.
// A subcommand reports failure by throwing CommandError (via fail()); main prints it as one
// line "adakv: error: ..." and exits 1.
#pragma once

#include <CLI/CLI.hpp>
#include <stdexcept>

#include "core/status.h"

namespace adakv::cli {

struct CommandError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const Status& status) { throw CommandError(status.message()); }

template <typename T>
T value_or_fail(Expected<T> e) {
  if (!e.has_value()) fail(e.status());
  return std::move(e).value();
}

void register_tokenize(CLI::App& app);
void register_generate(CLI::App& app);
void register_inspect(CLI::App& app);
void register_serve(CLI::App& app);  // the OpenAI-compatible server (cmd_serve.cc)
void register_bench(CLI::App& app);  // `adakv bench serve` (cmd_bench_serve.cc)
// `adakv eval` (cmd_eval.cc) and its kinds, each registered from its own cmd_eval_<kind>.cc.
void register_eval(CLI::App& app);
void register_eval_fidelity(CLI::App& eval);
void register_eval_tasks(CLI::App& eval);  // needle | ruler | longbench | kvpress (cmd_eval_tasks.cc)

}  // namespace adakv::cli
