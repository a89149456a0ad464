#include "compress/compress_config.h"

#include <cmath>
#include <limits>

namespace adakv {

namespace {

struct PolicyName {
  KvPolicy policy;
  const char* name;
};

constexpr PolicyName kPolicyNames[] = {
    {KvPolicy::kFull, "full"},
    {KvPolicy::kStreamingLlm, "streamingllm"},
    {KvPolicy::kH2o, "h2o"},
    {KvPolicy::kSnapKv, "snapkv"},
    {KvPolicy::kPyramidKv, "pyramidkv"},
    {KvPolicy::kAdaSnapKv, "ada-snapkv"},
    {KvPolicy::kAdaPyramidKv, "ada-pyramidkv"},
    {KvPolicy::kCriticalKv, "criticalkv"},
    {KvPolicy::kAdaCriticalKv, "ada-criticalkv"},
    {KvPolicy::kKvCompress, "kvcompress"},
    {KvPolicy::kRandom, "random"},
};

constexpr int32_t kMaxWindow = 1 << 20;
constexpr int32_t kMaxKernel = 1023;
constexpr int32_t kMaxInterval = 1 << 20;
constexpr int32_t kMaxBeta = 1 << 20;

std::string range_error(const char* flag, const std::string& value, const std::string& range) {
  return std::string("--") + flag + " " + value + " is out of range: allowed " + range;
}

}  // namespace

const char* kv_policy_name(KvPolicy p) {
  for (const PolicyName& n : kPolicyNames)
    if (n.policy == p) return n.name;
  return "?";
}

std::string kv_policy_names() {
  std::string s;
  for (const PolicyName& n : kPolicyNames) {
    if (!s.empty()) s += " | ";
    s += n.name;
  }
  return s;
}

Expected<KvPolicy> parse_kv_policy(std::string_view name) {
  for (const PolicyName& n : kPolicyNames)
    if (name == n.name) return n.policy;
  return invalid_argument("--kv-policy '" + std::string(name) + "' is unknown: allowed " + kv_policy_names());
}

Expected<PoolKind> parse_pool_kind(std::string_view name) {
  if (name == "max") return PoolKind::kMax;
  if (name == "avg") return PoolKind::kAvg;
  return invalid_argument("--kv-pool '" + std::string(name) + "' is unknown: allowed max | avg");
}

Expected<GqaReduce> parse_gqa_reduce(std::string_view name) {
  if (name == "mean") return GqaReduce::kMean;
  if (name == "max") return GqaReduce::kMax;
  return invalid_argument("--kv-gqa '" + std::string(name) + "' is unknown: allowed mean | max");
}

const char* pool_kind_name(PoolKind p) { return p == PoolKind::kMax ? "max" : "avg"; }

const char* gqa_reduce_name(GqaReduce g) {
  switch (g) {
    case GqaReduce::kMean: return "mean";
    case GqaReduce::kMax: return "max";
    case GqaReduce::kSum: return "sum";
  }
  return "?";
}

bool policy_compresses(KvPolicy p) { return p != KvPolicy::kFull; }

bool policy_is_adaptive(KvPolicy p) {
  return p == KvPolicy::kAdaSnapKv || p == KvPolicy::kAdaPyramidKv || p == KvPolicy::kAdaCriticalKv;
}

bool policy_uses_pyramid(KvPolicy p) { return p == KvPolicy::kPyramidKv || p == KvPolicy::kAdaPyramidKv; }

bool policy_uses_window_scores(KvPolicy p) {
  switch (p) {
    case KvPolicy::kSnapKv:
    case KvPolicy::kPyramidKv:
    case KvPolicy::kAdaSnapKv:
    case KvPolicy::kAdaPyramidKv:
    case KvPolicy::kCriticalKv:
    case KvPolicy::kAdaCriticalKv:
      return true;
    default:
      return false;
  }
}

bool policy_is_two_stage(KvPolicy p) { return p == KvPolicy::kCriticalKv || p == KvPolicy::kAdaCriticalKv; }

bool policy_is_continual(KvPolicy p) {
  return p == KvPolicy::kStreamingLlm || p == KvPolicy::kH2o || p == KvPolicy::kKvCompress;
}

Status validate_compress_config(const CompressConfig& c) {
  const std::string int_max = std::to_string(std::numeric_limits<int32_t>::max());
  if (c.window < 1 || c.window > kMaxWindow)
    return invalid_argument(range_error("kv-window", std::to_string(c.window), "[1, " + std::to_string(kMaxWindow) + "]"));
  if (c.pool_kernel < 1 || c.pool_kernel > kMaxKernel || c.pool_kernel % 2 == 0)
    return invalid_argument(range_error("kv-pool-kernel", std::to_string(c.pool_kernel),
                                        "odd values in [1, " + std::to_string(kMaxKernel) + "] (1 disables pooling)"));
  if (!(c.alpha >= 0.0 && c.alpha <= 1.0))  // also refuses NaN
    return invalid_argument(range_error("kv-alpha", std::to_string(c.alpha), "[0, 1]"));
  if (c.beta < 1 || c.beta > kMaxBeta)
    return invalid_argument(range_error("kv-beta", std::to_string(c.beta), "[1, " + std::to_string(kMaxBeta) + "]"));
  if (c.gqa == GqaReduce::kSum)
    return invalid_argument("--kv-gqa sum is internal to kvcompress: allowed mean | max");
  if (c.interval < 1 || c.interval > kMaxInterval)
    return invalid_argument(range_error("kv-interval", std::to_string(c.interval), "[1, " + std::to_string(kMaxInterval) + "]"));
  if (c.protected_window < 0 || c.protected_window > kMaxWindow)
    return invalid_argument(range_error("kv-protected-window", std::to_string(c.protected_window),
                                        "[0, " + std::to_string(kMaxWindow) + "]"));
  if (c.sink < 0) return invalid_argument(range_error("kv-sink", std::to_string(c.sink), "[0, kv-budget - 1]"));
  if (c.max_cache_tokens < 0 || c.max_cache_tokens > std::numeric_limits<int32_t>::max())
    return invalid_argument(range_error("kv-max-cache-tokens", std::to_string(c.max_cache_tokens),
                                        "[1, " + int_max + "], or 0 for kv-budget"));

  switch (c.policy) {
    case KvPolicy::kFull:
      return Status::ok();  // budget and the rest are ignored
    case KvPolicy::kStreamingLlm:
      if (c.budget < 1)
        return invalid_argument(range_error("kv-budget", std::to_string(c.budget), "[1, " + int_max + "] for streamingllm"));
      if (c.sink >= c.budget)
        return invalid_argument(range_error("kv-sink", std::to_string(c.sink),
                                            "[0, kv-budget - 1] = [0, " + std::to_string(c.budget - 1) + "]"));
      return Status::ok();
    case KvPolicy::kKvCompress: {
      const int64_t t = c.max_cache_tokens > 0 ? c.max_cache_tokens : c.budget;
      if (t < 1)
        return invalid_argument("--kv-max-cache-tokens (or --kv-budget) is required for kvcompress: allowed [1, " + int_max + "]");
      return Status::ok();
    }
    default:
      // Budget includes the window: the selection needs at least one entry beyond it.
      if (c.budget <= c.window)
        return invalid_argument(range_error("kv-budget", std::to_string(c.budget),
                                            "(kv-window, " + int_max + "] = [" + std::to_string(c.window + 1) + ", " + int_max +
                                                "]: the budget includes the window of " + std::to_string(c.window)));
      return Status::ok();
  }
}

}  // namespace adakv
