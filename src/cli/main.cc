// adakv: command-line entry point. Errors are printed as one line "adakv: error: ..." and the
// process exits non-zero.
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "core/printable.h"

namespace {
// Messages may quote text from the user's files; printed one line (control bytes as \xNN), bounded.
constexpr size_t kMaxMessage = 4000;
using adakv::printable;
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"adakv: an inference engine with a per-head paged KV cache"};
  app.require_subcommand(1);
  adakv::cli::register_tokenize(app);
  adakv::cli::register_generate(app);
  adakv::cli::register_inspect(app);
  adakv::cli::register_eval(app);
  adakv::cli::register_serve(app);
  adakv::cli::register_bench(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help and friends
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Usage errors (missing --model, unknown flag, bad value) as one line like every other error.
    std::fprintf(stderr, "adakv: error: %s (see adakv --help)\n", printable(e.what(), kMaxMessage).c_str());
    return e.get_exit_code() != 0 ? e.get_exit_code() : 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adakv: error: %s\n", printable(e.what(), kMaxMessage).c_str());
    return 1;
  }
  return 0;
}
