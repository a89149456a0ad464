// The --kv-* compression flags, shared by every subcommand that runs a cache (generate, inspect,
// eval). Parsed into a CompressConfig with src/compress's parse_* and validate_compress_config:
// an out-of-range value fails the command with one line that names the allowed range.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

#include "compress/compress_config.h"

namespace adakv::cli {

struct KvFlags {
  std::string policy = "full";
  int64_t budget = 0;
  int64_t window = 32;
  std::string pool = "max";
  int64_t pool_kernel = 7;
  double alpha = 0.2;
  int64_t beta = 20;
  std::string gqa = "mean";
  int64_t sink = 4;
  int64_t max_cache_tokens = 0;
  int64_t protected_window = 32;
  int64_t interval = 16;
  uint64_t seed = 0;
};

// Adds the flags to `cmd`; `with_policy` false leaves out --kv-policy / --kv-budget (eval
// fidelity takes lists of them instead).
void add_kv_flags(CLI::App* cmd, KvFlags& flags, bool with_policy = true);
// The validated config for `policy` and `budget` (the flags' own when not given); fails the
// command on any bad value.
CompressConfig kv_config_or_fail(const KvFlags& flags);
CompressConfig kv_config_or_fail(const KvFlags& flags, const std::string& policy, int64_t budget);

}  // namespace adakv::cli
