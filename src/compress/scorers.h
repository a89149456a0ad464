// Token-importance scores of one (layer, kv head) row from plain arrays (method.md section 1).
// Host reference code: every function reads fp32 inputs and works in double internally, so the
// result differs from an exact computation by the final fp32 rounding only (the numpy reference
// in tools/reference/ then agrees bit for bit in all but vanishingly rare cases). The GPU path
// computes the same quantities with kernels and is tested against these functions.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "compress/compress_config.h"

namespace adakv {

// One kv head's view of a layer: the queries of its group and the row's keys (after RoPE).
struct HeadAttentionInputs {
  const float* queries = nullptr;  // [num_queries][num_heads][head_dim]: the last num_queries tokens
  int32_t num_queries = 0;
  int32_t num_heads = 0;           // H (query heads)
  int32_t head_dim = 0;
  int32_t kv_head = 0;
  int32_t group = 1;               // g = H / Hkv; query head h reads kv head h / g
  const float* keys = nullptr;     // [length] rows of head_dim floats, key_stride floats apart
  int64_t key_stride = 0;
  int32_t length = 0;              // L: the row's entries; the queries are its last num_queries
};

// 1.1 steps 2-4 for every key: [g][L] mean over the last `window` queries of the softmax
// probabilities (fp32 inputs, causal inside the window: query i sees keys j <= L - window + i).
std::vector<double> window_mean_probs(const HeadAttentionInputs& in, int32_t window);
// KV-Compress: [g][L] sum over the last `window` queries of the squared probabilities.
std::vector<double> window_squared_probs(const HeadAttentionInputs& in, int32_t window);
// H2O: [L] sum over all num_queries queries of the group-reduced probabilities.
std::vector<double> accumulated_probs(const HeadAttentionInputs& in, GqaReduce reduce);

// [g][n] -> [n]: mean, max or sum over the group's query heads.
std::vector<double> reduce_group(std::span<const double> per_head, int32_t group, int32_t n, GqaReduce reduce);
// 1-D pooling, kernel odd, stride 1, padding kernel/2, output length = input length. Max pools
// over the in-range neighbours; avg divides by the kernel (zero padding dilutes the edges).
std::vector<double> pool_1d(std::span<const double> x, PoolKind kind, int32_t kernel);

// SnapKV (1.1): [L - window] pooled score of the prefix keys, double. Empty when L <= window.
std::vector<double> snapkv_head_scores(const HeadAttentionInputs& in, int32_t window, GqaReduce gqa, PoolKind pool,
                                       int32_t kernel);
// KV-Compress prefill metric: [L] squared probabilities summed over window queries and over the
// group, then pooled along the whole row (kernel 1: no pooling). Window keys get their metric
// too: once they leave the protected window they compete like any other entry.
std::vector<double> kvcompress_head_metric(const HeadAttentionInputs& in, int32_t window, PoolKind pool, int32_t kernel);

// CriticalKV: [L] mean over the group of || v_j W_o^h ||_1. values: [L] rows, value_stride
// floats apart; o_proj: [hidden][num_heads * head_dim] (the checkpoint's o_proj.weight layout,
// out = W x), so W_o^h is its columns h*d .. h*d+d-1, transposed.
std::vector<double> critical_value_norms(const float* values, int64_t value_stride, int32_t length, const float* o_proj,
                                         int32_t hidden_size, int32_t num_heads, int32_t head_dim, int32_t kv_head,
                                         int32_t group);
constexpr double kCriticalEpsilon = 1e-4;

// Seeded uniform scores in [0, 1) with 24 random bits (exact in fp32), a pure function of
// (seed, layer, kv_head, index) so re-running a request reproduces them:
//   b = sm(sm(sm(seed) ^ layer) ^ kv_head);  score = (sm(b ^ index) >> 40) / 2^24,
// with sm = splitmix64.
uint64_t splitmix64(uint64_t x);
std::vector<float> random_scores(uint64_t seed, int32_t layer, int32_t kv_head, int32_t n);

std::vector<float> to_float(std::span<const double> x);

}  // namespace adakv
