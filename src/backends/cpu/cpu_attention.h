// CPU attention over the per-head paged KV cache: every KV head of a layer reads its OWN entries
// (rows may hold different numbers of entries after compression); query heads of a GQA group
// share their KV head's entries in place, nothing is copied per query head.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kv/cpu_kv_storage.h"

namespace adakv::cpu {

// One layer of one sequence as the attention reads it.
struct PagedKvRows {
  const CpuKvStorage* storage = nullptr;
  int32_t page_size = 16;
  std::vector<std::span<const int32_t>> pages;  // [kv_heads] -> the row's page ids, in order
  std::vector<int32_t> lengths;                 // [kv_heads] -> entries in the row

  int64_t num_kv_heads() const { return static_cast<int64_t>(lengths.size()); }
  // Pool slot of entry i of KV head h: pages[h][i / page_size] * page_size + i % page_size.
  KvSlot slot(int64_t h, int32_t i) const {
    return static_cast<KvSlot>(pages[h][i / page_size]) * page_size + i % page_size;
  }
};

enum class AttentionPath {
  kAuto,     // kGemm from kGemmMinTokens query tokens on, else kByToken
  kByToken,  // per (token, kv head) walk over the pages in place: decode
  kGemm,     // per kv head: gather the row, sgemm scores and outputs by query blocks: prefill
};
inline constexpr int64_t kGemmMinTokens = 8;

// out[t][h] = softmax_j(scale * q[t][h] . k_j) . v_j over the entries j of KV head h / g whose
// stored token position is <= q_positions[t] (causal by position, which also gives the
// bottom-right aligned mask when several tokens are appended to a compressed row).
// q, out: [n][num_heads][head_dim]; num_heads must be a multiple of rows.num_kv_heads().
// A query that sees no entry gets zeros.
void paged_attention(const float* q, const int32_t* q_positions, int64_t n, int64_t num_heads,
                     const PagedKvRows& rows, float scale, float* out, AttentionPath path = AttentionPath::kAuto);

}  // namespace adakv::cpu
