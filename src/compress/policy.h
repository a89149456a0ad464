// The policy layer: from one layer's tensors to scores (compute_layer_scores), and from scores
// to a plan -- keep lists per kv head (plan_layer). Pure host logic over plain arrays: no pages,
// no storage. KvCompressor (kv_compressor.h) drives it against the cache.
#pragma once

#include <compare>
#include <cstdint>
#include <span>
#include <vector>

#include "compress/allocators.h"
#include "compress/compress_config.h"
#include "core/status.h"

namespace adakv {

// One layer of one sequence, as the forward pass (or a fixture) holds it; every row's queries
// are the last num_queries tokens of that row (keys and queries after RoPE).
struct LayerTensors {
  int32_t num_heads = 0;     // H
  int32_t num_kv_heads = 0;  // Hkv
  int32_t head_dim = 0;
  const float* queries = nullptr;  // [num_queries][H][head_dim]
  int32_t num_queries = 0;         // >= window for window scores; H2O: all prompt tokens
  std::vector<int32_t> lengths;    // [Hkv] entries of each row
  std::vector<const float*> keys;  // [Hkv] -> [lengths[h]] rows, kv_stride floats apart
  std::vector<const float*> values;  // [Hkv] -> same layout; CriticalKV only
  int64_t kv_stride = 0;
  const float* o_proj = nullptr;   // [hidden][H * head_dim] fp32; CriticalKV only
  int32_t hidden_size = 0;
};

// Scores of one layer. Candidates of row h are its entries 0 .. n_h-1, n_h = max(0, L_h - w);
// the last w entries form the window, always kept.
struct LayerScores {
  std::vector<int32_t> lengths;  // [Hkv] L_h
  HeadScores scores;             // [Hkv][n_h] selection score (pooled SnapKV, H2O, random)
  HeadScores crit;               // [Hkv][n_h] CriticalKV second-stage score; empty otherwise
  HeadScores metric;             // [Hkv][L_h] per-entry running metric, window included: KV-Compress
                                 // metric or H2O accumulated attention; empty otherwise
};

// The decision for one layer.
struct LayerPlan {
  int32_t layer = 0;
  bool compressed = false;        // false: every row keeps all its entries
  int32_t selection_budget = 0;   // Bs_l: candidates each head selects on average
  std::vector<int32_t> lengths;   // [Hkv] entries before
  std::vector<int32_t> counts;    // [Hkv] Ada-KV c_h (global top-k winners); empty if not adaptive
  std::vector<int32_t> budgets;   // [Hkv] B_h: candidates selected (window excluded)
  std::vector<std::vector<int32_t>> keep;  // [Hkv] entry indices kept, ascending
};

// Bs_l of `layer`: B - w, or the pyramid schedule for prompt_length (method.md 2.3).
int32_t layer_selection_budget(const CompressConfig& c, int32_t num_layers, int32_t layer, int32_t prompt_length);

// Scores for the config's policy (StreamingLLM and full need none: lengths only). Fails when
// inputs the policy needs are missing (too few queries, no o_proj for CriticalKV). Heads are
// scored in parallel on the global thread pool.
Expected<LayerScores> compute_layer_scores(const CompressConfig& c, int32_t layer, const LayerTensors& t);

// What compute_layer_scores' result depends on besides the layer's tensors (and the layer, for
// random): configs with equal keys get identical LayerScores from identical tensors, whatever
// their budget or allocation. The SnapKV family and random's selection scores differ in kind;
// snapkv, ada-snapkv, pyramidkv and ada-pyramidkv share kWindow; criticalkv and ada-criticalkv
// share kWindowCritical. Knobs a kind does not read are zero, so they never split a key.
enum class ScoreKind : uint8_t { kNone, kWindow, kWindowCritical, kH2o, kRandom, kKvCompress };
struct ScoreKey {
  ScoreKind kind = ScoreKind::kNone;  // kNone: full, StreamingLLM (lengths only)
  int32_t window = 0;
  GqaReduce gqa = GqaReduce::kMean;
  PoolKind pool = PoolKind::kMax;
  int32_t pool_kernel = 0;
  uint64_t seed = 0;
  auto operator<=>(const ScoreKey&) const = default;
};
ScoreKey score_key(const CompressConfig& c);

// Keep lists for the window-score policies, H2O and random (uniform or Ada-KV allocation;
// CriticalKV two-stage selection: top floor(B_h/2) by score, the rest by crit).
LayerPlan plan_layer(const CompressConfig& c, int32_t layer, int32_t selection_budget, const LayerScores& s);
// StreamingLLM: the first `sink` entries and the last B - sink of every row longer than B.
LayerPlan plan_streaming(const CompressConfig& c, int32_t layer, std::span<const int32_t> lengths);

}  // namespace adakv
