// The element-wise and gather ops of the transformer forward on the GPU (the projections are
// cuBLASLt, gemm_lt.h; attention is decode_attention.h / prefill_attention.h / attention_generic
// below). One .cu file per purpose: embed_gather, rms_norm, qkv_rope, swiglu, kv_append,
// attention_generic, random_fill. Every op mirrors a CPU oracle in src/backends/cpu/cpu_ops.h
// (tests/gpu/test_model_ops.cc): bf16 storage, fp32 arithmetic.
//
// The residual stream is fp32 ([tokens][hidden]); everything a GEMM reads or writes is bf16.
// Small weights (norms, biases, RoPE frequencies) stay fp32 on the device: they cost nothing and
// keep the element-wise ops at the CPU's precision.
//
// All launches are asynchronous on `stream`, allocate nothing and take only device pointers and
// plain values (CUDA-graph friendly). Each returns the launch error as a Status.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/status.h"

namespace adakv::cuda {

// x[t][:] = table[tokens[t]][:] as fp32. table [vocab][hidden] bf16, x [n][hidden] fp32. Token
// ids must be in range (the host validates them: a kernel cannot report a bad id).
Status embed_gather(const __nv_bfloat16* table, int64_t hidden, const int32_t* tokens, int32_t n, float* x,
                    cudaStream_t stream);

// The residual add fused with the next RMSNorm (LlamaRMSNorm: y = w * (x * rsqrt(mean(x^2) + eps))).
struct RmsNormArgs {
  float* x = nullptr;                     // [rows][dim] fp32 residual stream
  const __nv_bfloat16* delta = nullptr;   // [rows][dim] block output added to x first, or null
  const float* delta_bias = nullptr;      // [dim] added with delta (o_proj bias), or null
  const float* weight = nullptr;          // [dim] fp32
  __nv_bfloat16* out = nullptr;           // [out_rows][dim]
  // Rows of x to normalise into out (the final norm of the tokens that need logits), or null for
  // all rows. With it, x is only read: x[row_index[r]] + delta is normalised into out[r].
  const int32_t* row_index = nullptr;     // [out_rows]
  int32_t rows = 0;                       // rows of x (and delta) when row_index is null
  int32_t out_rows = 0;                   // with row_index: its length
  int32_t dim = 0;
  float eps = 1e-6f;
};
Status rms_norm_residual(const RmsNormArgs& args, cudaStream_t stream);

// --- the device KV pool as the model's kernels see it ---------------------------------------------
// Page tables are mirrored densely: row g (the manager's row id, seq * layers * Hkv + layer * Hkv +
// kv head) owns page_table[g * max_pages_per_row ...]; only the first ceil(length / 16) are valid.
// A step's batch is described per sequence b (B of them) and per token t (n of them).
struct DeviceKvPool {
  __nv_bfloat16* k_pool = nullptr;  // [num_pages][kPageSize][head_dim]
  __nv_bfloat16* v_pool = nullptr;  // [num_pages][kPageSize][head_dim]
  int32_t* positions = nullptr;     // [num_pages * kPageSize] token position of each slot
  int64_t page_stride = 0;          // elements from one page to the next
  const int32_t* page_table = nullptr;  // [max rows][max_pages_per_row]
  int32_t max_pages_per_row = 0;
};

struct StepBatchView {
  const int32_t* seq_ids = nullptr;     // [B] the manager's sequence ids
  const int32_t* seq_ntok = nullptr;    // [B] tokens of each sequence in this step
  const int32_t* row_len = nullptr;     // [B][layers][Hkv] row lengths after this step's commit
  const int32_t* token_seq = nullptr;   // [n] b of each token
  const int32_t* token_index = nullptr; // [n] index of the token within its sequence's step
  const int32_t* positions = nullptr;   // [n] token positions
  int32_t num_tokens = 0;
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
};

// The attention input prologue on the fused projection output, in place, per token and head, in
// the CPU forward's order: + bias (q/k/v), per-head RMSNorm of q and k (Qwen3), RoPE of q and k
// (HF rotate_half, angle = float(inv_freq[i] * position)). V heads get the bias only.
struct QkvRopeArgs {
  __nv_bfloat16* qkv = nullptr;  // [n][row_stride]: q [H][d] | k [Hkv][d] | v [Hkv][d]
  int64_t row_stride = 0;        // elements, >= (H + 2 Hkv) * d
  int32_t n = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;          // even, <= 256
  const float* bias = nullptr;   // [(H + 2 Hkv) d] or null
  const float* q_norm = nullptr; // [d] or null
  const float* k_norm = nullptr; // [d] or null (set together with q_norm)
  float eps = 1e-6f;
  const float2* cos_sin = nullptr;  // [n][d / 2] from rope_cos_sin
  // Optional, with pool.k_pool set: each token's K (after RoPE) and V also go into the entries
  // the step committed, as kv_append() writes them (and the slot's position), in the same launch:
  // a decode step's layer has one small kernel less in its chain. head_dim a multiple of 8.
  DeviceKvPool pool;
  StepBatchView batch;  // batch.num_tokens == n
  int32_t layer = 0;
};
Status qkv_rope(const QkvRopeArgs& args, cudaStream_t stream);

// cos_sin[t][i] = (cos, sin) of float(inv_freq[i] * positions[t]), evaluated in double and rounded
// (the CPU oracle's cos/sin); once per step, shared by every layer and head.
Status rope_cos_sin(const float* inv_freq, const int32_t* positions, int32_t n, int32_t half, float2* cos_sin,
                    cudaStream_t stream);

// out[r][i] = silu(gate_up[r][i]) * gate_up[r][inter + i]. gate_up [rows][2 inter], out [rows][inter].
Status swiglu(const __nv_bfloat16* gate_up, __nv_bfloat16* out, int32_t rows, int32_t inter, cudaStream_t stream);

// Page-table mirror updates: table[updates[i].x] = updates[i].y for i < n (flat index, page id).
Status page_table_scatter(const int2* updates, int32_t n, int32_t* table, cudaStream_t stream);

// Writes K and V of every token (from the fused qkv rows) into the entries the step committed:
// entry row_len - seq_ntok + token_index of row (seq, layer, kv head); also the slot's position.
Status kv_append(const DeviceKvPool& pool, const StepBatchView& batch, int32_t layer, const __nv_bfloat16* qkv,
                 int64_t qkv_row_stride, int32_t k_offset, int32_t v_offset, int32_t head_dim, cudaStream_t stream);

// Copies the first `length` entries of the rows (seq, layer, 0..Hkv-1) into contiguous
// k_out / v_out [Hkv][out_head_stride / head_dim][head_dim] (row h at h * out_head_stride): the
// prior entries of a row plus the step's own, for prefill attention over a chunk appended to a
// cache. lengths [Hkv] on the device.
Status kv_gather_rows(const DeviceKvPool& pool, int32_t seq, int32_t layer, int32_t num_layers, int32_t num_kv_heads,
                      int32_t head_dim, const int32_t* lengths, int32_t max_length, __nv_bfloat16* k_out,
                      __nv_bfloat16* v_out, int64_t out_head_stride, cudaStream_t stream);

// Attention over the paged rows for any head dim (<= 256, multiple of 8) and group size: the
// fallback for shapes the tensor-core kernels do not cover (the fixtures' head dims 16 and 32).
// Query token t (index i of n_b in its sequence) of head h sees the first row_len - n_b + i + 1
// entries of row (seq, layer, h / g): causal, bottom-right aligned. One warp per (token, head),
// fp32 online softmax. q [n][H][d] rows q_row_stride apart, out [n][H][d] rows out_row_stride apart.
Status attention_generic(const DeviceKvPool& pool, const StepBatchView& batch, int32_t layer, int32_t num_heads,
                         int32_t head_dim, const __nv_bfloat16* q, int64_t q_row_stride, __nv_bfloat16* out,
                         int64_t out_row_stride, float scale, cudaStream_t stream);

// Random fills for synthetic models and pools (never zeros): value = scale * u, u uniform in
// [-1, 1) from a hash of (seed, index), plus `offset`. Deterministic for a seed.
Status random_fill_bf16(__nv_bfloat16* out, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t stream);
Status random_fill_f32(float* out, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t stream);

}  // namespace adakv::cuda
