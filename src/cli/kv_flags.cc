#include "cli/kv_flags.h"

#include <limits>

#include "cli/commands.h"

namespace adakv::cli {
namespace {

// Narrows a flag value to int32, refusing what does not fit with the flag's name.
int32_t to_i32(const char* flag, int64_t v) {
  if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    fail(invalid_argument(std::string("--") + flag + " " + std::to_string(v) + " is out of range: allowed at most " +
                          std::to_string(std::numeric_limits<int32_t>::max())));
  return static_cast<int32_t>(v);
}

}  // namespace

void add_kv_flags(CLI::App* cmd, KvFlags& f, bool with_policy) {
  if (with_policy) {
    cmd->add_option("--kv-policy", f.policy, "KV-cache policy: " + kv_policy_names())->capture_default_str();
    cmd->add_option("--kv-budget", f.budget, "Entries per KV head per layer on average, window included");
  }
  cmd->add_option("--kv-window", f.window, "Observation window (always kept)")->capture_default_str();
  cmd->add_option("--kv-pool", f.pool, "Score pooling: max | avg")->capture_default_str();
  cmd->add_option("--kv-pool-kernel", f.pool_kernel, "Odd pooling kernel; 1 = off")->capture_default_str();
  cmd->add_option("--kv-alpha", f.alpha, "Ada-KV safeguard alpha in [0, 1]")->capture_default_str();
  cmd->add_option("--kv-beta", f.beta, "PyramidKV beta")->capture_default_str();
  cmd->add_option("--kv-gqa", f.gqa, "Score reduction over a GQA group: mean | max")->capture_default_str();
  cmd->add_option("--kv-sink", f.sink, "StreamingLLM sink tokens")->capture_default_str();
  cmd->add_option("--kv-max-cache-tokens", f.max_cache_tokens, "KV-Compress T per (layer, kv head); 0 = --kv-budget")
      ->capture_default_str();
  cmd->add_option("--kv-protected-window", f.protected_window, "KV-Compress: newest tokens never evicted")
      ->capture_default_str();
  cmd->add_option("--kv-interval", f.interval, "Continual policies: compress every N decode steps")->capture_default_str();
  cmd->add_option("--kv-seed", f.seed, "Seed of the random policy")->capture_default_str();
}

CompressConfig kv_config_or_fail(const KvFlags& f) { return kv_config_or_fail(f, f.policy, f.budget); }

CompressConfig kv_config_or_fail(const KvFlags& f, const std::string& policy, int64_t budget) {
  CompressConfig c;
  c.policy = value_or_fail(parse_kv_policy(policy));
  c.pool = value_or_fail(parse_pool_kind(f.pool));
  c.gqa = value_or_fail(parse_gqa_reduce(f.gqa));
  c.budget = to_i32("kv-budget", budget);
  c.window = to_i32("kv-window", f.window);
  c.pool_kernel = to_i32("kv-pool-kernel", f.pool_kernel);
  c.alpha = f.alpha;
  c.beta = to_i32("kv-beta", f.beta);
  c.sink = to_i32("kv-sink", f.sink);
  c.max_cache_tokens = f.max_cache_tokens;
  c.protected_window = to_i32("kv-protected-window", f.protected_window);
  c.interval = to_i32("kv-interval", f.interval);
  c.seed = f.seed;
  Status valid = validate_compress_config(c);
  if (!valid.is_ok()) fail(valid);
  return c;
}

}  // namespace adakv::cli
