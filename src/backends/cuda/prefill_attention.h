// Prefill attention: the queries of a prompt (or of a chunk appended to a context) against the
// layer's full, contiguous K/V, causal, GQA, head dims 64 and 128. FlashAttention-2's algorithm:
// tiles of 128 queries against tiles of keys, online softmax, never an Lq x Lk matrix, memory
// O(Lq + Lk) whatever the length.
//
// Computation, for query i (0..Lq-1) of query head h, kv head h / g (g = H / Hkv):
//   out[i][h] = softmax_j(scale * q[i][h] . k[j][h / g]) v[j][h / g]
//   lse[h][i] = ln sum_j exp(scale * q[i][h] . k[j][h / g])              (optional output)
// over keys j < Lk, and when causal j <= i + (Lk - Lq): the queries are the LAST Lq positions of
// the Lk-long sequence (bottom-right aligned mask), so a prompt (Lq == Lk), a chunk of a chunked
// prefill, or a question appended after a (compressed) context all use the same call.
// bf16 q/k/v/out, fp32 accumulation and softmax, P rounded to bf16 for the second product
// (as FlashAttention does).
//
// FLOP model (the bench and the SDPA peer use the same): 4 * d * H * pairs, where pairs is the
// number of (query, key) pairs the mask lets through: Lq * Lk without a mask, and with the causal
// mask sum_i (i + Lk - Lq + 1) = Lq * (Lk - Lq + 1) + Lq * (Lq - 1) / 2 (L * (L + 1) / 2 for a
// prompt). 2 FLOPs per multiply-add, two products (QK^T and PV); softmax not counted.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/status.h"

namespace adakv::cuda {

struct PrefillAttentionArgs {
  const __nv_bfloat16* q = nullptr;  // [num_q][num_qo_heads][head_dim], rows q_row_stride apart
  const __nv_bfloat16* k = nullptr;  // [num_k][num_kv_heads][head_dim], rows k_row_stride apart
  const __nv_bfloat16* v = nullptr;  // [num_k][num_kv_heads][head_dim], rows v_row_stride apart
  __nv_bfloat16* out = nullptr;      // [num_q][num_qo_heads][head_dim], rows out_row_stride apart
  float* lse = nullptr;              // optional [num_qo_heads][num_q] natural log, or nullptr
  int32_t num_q = 0;                 // Lq >= 0 (0: nothing to do)
  int32_t num_k = 0;                 // Lk >= 1; causal needs Lk >= Lq
  int32_t num_qo_heads = 0;
  int32_t num_kv_heads = 0;          // divides num_qo_heads
  int32_t head_dim = 0;              // 64 or 128
  // Elements from one position to the next; 0 = dense (heads * head_dim). Lets q/k/v live in one
  // fused QKV buffer. Multiples of 8 (16-byte rows); all pointers 16-byte aligned.
  int64_t q_row_stride = 0;
  int64_t k_row_stride = 0;
  int64_t v_row_stride = 0;
  int64_t out_row_stride = 0;
  float softmax_scale = 0.f;  // > 0, usually 1 / sqrt(head_dim)
  bool causal = true;
};

enum class PrefillKernel {
  kAuto,     // kWgmma with 128-key tiles where it runs and block_n is 0, else kMmaSync
  kMmaSync,  // mma.sync, sm_80 and up, head dims 64 and 128 (prefill_attention.cuh)
  kWgmma,    // warpgroup MMA, sm_90a devices, head dim 128 (prefill_attention_wgmma.cu)
};

struct PrefillAttentionOptions {
  // Keys per tile: 0 = the default (64); else for the mma.sync kernel 32 or 64 at head dim 128,
  // 64 or 128 at head dim 64, for the wgmma kernel 64 or 128 (the bench times all of them).
  int32_t block_n = 0;
  PrefillKernel kernel = PrefillKernel::kAuto;
};

// Checks the arguments (a message naming the problem otherwise) and launches on `stream`
// (asynchronous; no allocation, no synchronisation, CUDA-graph friendly once the device's
// shared-memory limit has been raised by a first call outside a capture).
Status prefill_attention(const PrefillAttentionArgs& args, cudaStream_t stream,
                         const PrefillAttentionOptions& options = {});

// (query, key) pairs the mask lets through; see the FLOP model above.
inline double prefill_attention_pairs(int64_t num_q, int64_t num_k, bool causal) {
  if (!causal) return double(num_q) * double(num_k);
  return double(num_q) * double(num_k - num_q + 1) + double(num_q) * double(num_q - 1) / 2.0;
}

inline double prefill_attention_flops(int64_t num_q, int64_t num_k, int64_t num_qo_heads, int64_t head_dim,
                                      bool causal) {
  return 4.0 * double(head_dim) * double(num_qo_heads) * prefill_attention_pairs(num_q, num_k, causal);
}

// --- kernel interface (instantiated per head dim in prefill_attention_d{64,128}.cu) ---------------
namespace prefill_detail {

inline constexpr int kBlockM = 128;  // queries per CTA (4 warps x 32 rows)
inline constexpr int kThreads = 128;

// Everything the kernel reads; passed by value (__grid_constant__).
struct PrefillParams {
  const __nv_bfloat16* q = nullptr;  // [num_q][H][D]
  const __nv_bfloat16* k = nullptr;  // [num_k][Hkv][D]
  const __nv_bfloat16* v = nullptr;  // [num_k][Hkv][D]
  __nv_bfloat16* out = nullptr;      // [num_q][H][D]
  float* lse = nullptr;              // [H][num_q] or nullptr
  int64_t q_row_stride = 0, k_row_stride = 0, v_row_stride = 0, out_row_stride = 0;  // elements
  int32_t num_q = 0, num_k = 0;
  int32_t num_qo_heads = 0;
  int32_t group_size = 0;   // H / Hkv
  int32_t q_offset = 0;     // position of query 0 in the key sequence (num_k - num_q)
  int32_t causal = 1;
  int32_t num_q_tiles = 0;  // ceil(num_q / kBlockM)
  float scale_log2 = 0.f;   // softmax scale * log2(e)
};

// Dynamic shared memory of one CTA: Q tile + two stages of K and V tiles.
constexpr size_t smem_bytes(int head_dim, int block_n) {
  return size_t(kBlockM + 4 * block_n) * size_t(head_dim) * 2;
}

// Grid: num_q_tiles * H CTAs of kThreads. block_n: 32/64 at D 128, 64/128 at D 64.
template <int kHeadDim>
cudaError_t prefill_attention_launch(const PrefillParams& p, int block_n, cudaStream_t stream);

// The wgmma kernel (head dim 128, sm_90a; block_n 64 or 128): grid num_q_tiles * H CTAs of two
// warpgroups.
cudaError_t prefill_attention_wgmma_launch(const PrefillParams& p, int block_n, cudaStream_t stream);
// Whether this binary holds the wgmma kernel's sm_90a code (a build without that architecture has
// only a stub that traps).
bool prefill_attention_wgmma_built();

extern template cudaError_t prefill_attention_launch<64>(const PrefillParams&, int, cudaStream_t);
extern template cudaError_t prefill_attention_launch<128>(const PrefillParams&, int, cudaStream_t);

}  // namespace prefill_detail
}  // namespace adakv::cuda
