// Observation-window scores on the GPU (method.md 1.1 and the KV-Compress metric), never
// materialising an L x L (or even w x L) probability matrix in device memory.
//
// For one layer of one sequence: the last w queries Qw [w][H][d] and all keys K [L][Hkv][d]
// (bf16, post-RoPE). With z[h,i,j] = q[h, L-w+i] . k[kv(h), j] / sqrt(d), causal inside the window
// (window query i sees keys j <= L - w + i), p = softmax over the visible keys in fp32:
//   SnapKV      S[kvh][j] = pool_k( gqa_{h in group}( mean_i p[h,i,j] ) ),  j < L - w
//   KV-Compress M[kvh][j] = pool_k( sum_{h in group} sum_i p[h,i,j]^2 ),    j < L (window included)
// gqa = mean or max over the g query heads; pool = max or avg (zero padding), kernel k odd,
// stride 1, padding k/2 (k = 1: none). These equal snapkv_head_scores / kvcompress_head_metric of
// compress/scorers.h to about 1e-6 relative (those work in fp64).
//
// How: pass 1 computes per (query row, span of 512 keys) the span's max logit and sum of
// exponentials (online over 64-key tiles); a merge kernel folds the spans of each row (fp64) into
// its max and 1 / sum; pass 2 recomputes the logits, turns them into probabilities and reduces
// them over the window rows and the group in shared memory (fp64 sums); a last kernel pools.
// Logits are tensor-core products, bf16 x bf16 with fp32 accumulation (score_mma.cuh).
// Everything is deterministic: the same inputs give bit-identical scores.
//
// Use: create() once (allocates the workspace for the largest L and w), then one call per layer;
// calls are asynchronous on `stream` and allocate nothing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "compress/compress_config.h"
#include "core/status.h"

namespace adakv::cuda {

struct WindowScorerOptions {
  int32_t num_heads = 0;     // H
  int32_t num_kv_heads = 0;  // Hkv; H % Hkv == 0, g = H / Hkv <= 64
  int32_t head_dim = 0;      // 64 or 128
  int32_t max_length = 0;    // longest L scored
  int32_t max_window = 32;   // longest w
};

struct WindowScoreInputs {
  const __nv_bfloat16* queries = nullptr;  // [w][H][head_dim]: the last w queries, tokens q_token_stride apart
  int64_t q_token_stride = 0;              // elements; 0 means H * head_dim
  const __nv_bfloat16* keys = nullptr;     // [L][Hkv][head_dim]: tokens k_token_stride apart
  int64_t k_token_stride = 0;              // elements; 0 means Hkv * head_dim
  int32_t length = 0;                      // L
  int32_t window = 0;                      // w
  // Elements between kv heads' keys; 0 means head_dim (the token-major layout above). Rows gathered
  // from the pages, [Hkv][rows][head_dim], are scored in one call with k_token_stride = head_dim
  // and k_head_stride = the gather's row stride.
  int64_t k_head_stride = 0;
};
// Pointers must be 16-byte aligned and strides multiples of 8 elements (16-byte loads).

class WindowScorer {
 public:
  static Expected<std::unique_ptr<WindowScorer>> create(const WindowScorerOptions& options);
  ~WindowScorer();
  WindowScorer(const WindowScorer&) = delete;
  WindowScorer& operator=(const WindowScorer&) = delete;

  // SnapKV: out [Hkv][out_stride] fp32, the first L - w of each row written. Needs L > w (when
  // L <= w nothing is scored: the whole row is window). gqa: kMean or kMax.
  Status snapkv(const WindowScoreInputs& in, GqaReduce gqa, PoolKind pool, int32_t kernel, float* out,
                int64_t out_stride, cudaStream_t stream);
  // KV-Compress prefill metric: out [Hkv][out_stride] fp32, L values per row. Needs 1 <= w <= L
  // (KvCompressor passes w = min(window, L)).
  Status kvcompress_metric(const WindowScoreInputs& in, PoolKind pool, int32_t kernel, float* out, int64_t out_stride,
                           cudaStream_t stream);

  // H2O prompt accumulation (method.md 1.2): out [Hkv][out_stride], L values per row:
  //   A[kvh][j] = sum over the w queries i (positions L - w .. L - 1) with i >= j of
  //               gqa_{h in group}( p[h,i,j] ),
  // gqa = mean or max, fp64 sums (mean: over every row of the group, divided by g once). w = L
  // scores the whole prompt; w < L one chunk of a chunked prompt (its queries against every key
  // before them), so the chunks' results add up to the whole prompt's. max_window does not limit
  // w: the workspace holds g * max_length rows. Equals accumulated_probs of compress/scorers.h to
  // about 1e-5 relative. Costs about twice the logits of the queries' attention (two passes on
  // tensor cores), no L x L matrix; once with `lse`: the log-sum-exp of these queries over these
  // keys ([H][w], natural log, e.g. prefill_attention's), which replaces the statistics pass.
  Status h2o(const WindowScoreInputs& in, GqaReduce gqa, float* out, int64_t out_stride, cudaStream_t stream,
             const float* lse = nullptr);

  const WindowScorerOptions& options() const { return options_; }

 private:
  WindowScorer() = default;
  Status run(const WindowScoreInputs& in, bool squared, GqaReduce gqa, PoolKind pool, int32_t kernel, int32_t out_len,
             float* out, int64_t out_stride, cudaStream_t stream, bool query_major, const float* lse = nullptr);

  WindowScorerOptions options_;
  int32_t group_ = 0;
  // Device workspace (one allocation).
  void* workspace_ = nullptr;
  float2* partial_ = nullptr;  // [Hkv][rows][spans] (span max, span sum)
  float2* stats_ = nullptr;    // [Hkv][g * max_window] (row max, 1 / row sum)
  float* reduced_ = nullptr;   // [Hkv][max_length] group-reduced scores before pooling
  int32_t max_segments_ = 1;   // H2O: query segments summed apart (see h2o_probs_kernel)
  double* seg_sums_ = nullptr; // [max_segments][Hkv][max_length] (null when max_segments is 1)
};

}  // namespace adakv::cuda
