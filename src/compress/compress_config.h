// The KV-cache compression configuration (the --kv-* flags) and its validation. Every knob and
// its default follow docs/compression.md (method spec: shared/docs/method.md).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "core/status.h"

namespace adakv {

enum class KvPolicy {
  kFull,           // no compression
  kStreamingLlm,   // sink + recent, continual
  kH2o,            // accumulated attention + recent window, continual
  kSnapKv,         // window scores, uniform per head
  kPyramidKv,      // window scores, pyramid layer schedule, uniform per head
  kAdaSnapKv,      // window scores, Ada-KV per-head allocation
  kAdaPyramidKv,   // pyramid schedule + Ada-KV allocation
  kCriticalKv,     // two-stage window score / output-projected value selection, uniform
  kAdaCriticalKv,  // the same with Ada-KV allocation
  kKvCompress,     // squared-probability metric, cross-layer block eviction, continual
  kRandom,         // seeded random scores, uniform (baseline)
};

enum class PoolKind { kMax, kAvg };
enum class GqaReduce { kMean, kMax, kSum };  // kSum: KV-Compress only, not a user choice

struct CompressConfig {
  KvPolicy policy = KvPolicy::kFull;
  int32_t budget = 0;            // B: entries per kv head per layer on average, window included
  int32_t window = 32;           // w: observation window (always kept)
  PoolKind pool = PoolKind::kMax;
  int32_t pool_kernel = 7;       // odd; 1 disables pooling
  double alpha = 0.2;            // Ada-KV safeguard
  int32_t beta = 20;             // PyramidKV
  GqaReduce gqa = GqaReduce::kMean;
  int32_t sink = 4;              // StreamingLLM
  int64_t max_cache_tokens = 0;  // KV-Compress T per (layer, kv head) on average; 0: use budget
  int32_t protected_window = 32; // KV-Compress: newest tokens never evicted
  int32_t interval = 16;         // continual policies: compress every `interval` decode steps
  bool pyramid_reference_rounding = false;  // reproduce the reference's floored step
  uint64_t seed = 0;             // kRandom
};

const char* kv_policy_name(KvPolicy p);
// "full | streamingllm | h2o | snapkv | ... | random"
std::string kv_policy_names();
Expected<KvPolicy> parse_kv_policy(std::string_view name);
Expected<PoolKind> parse_pool_kind(std::string_view name);  // max | avg
Expected<GqaReduce> parse_gqa_reduce(std::string_view name);  // mean | max
const char* pool_kind_name(PoolKind p);
const char* gqa_reduce_name(GqaReduce g);

// What a policy does, so callers never switch on the policy themselves.
bool policy_compresses(KvPolicy p);          // false only for kFull
bool policy_is_adaptive(KvPolicy p);         // Ada-KV allocation
bool policy_uses_pyramid(KvPolicy p);        // PyramidKV layer schedule
bool policy_uses_window_scores(KvPolicy p);  // SnapKV observation-window scores
bool policy_is_two_stage(KvPolicy p);        // CriticalKV selection
bool policy_is_continual(KvPolicy p);        // compresses during decode too

// Refuses every out-of-range value with a message naming the flag and the allowed range.
Status validate_compress_config(const CompressConfig& c);

}  // namespace adakv
