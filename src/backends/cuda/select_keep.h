// Keep selection on the GPU for one layer of one sequence (method.md 2.1, 2.2, CriticalKV's two
// stages): from per-head scores S [Hkv][n] (n = L - w candidates per head, the prefix) to the
// ascending keep list of every kv head, bit-identical to plan_layer (compress/policy.h) for the
// same fp32 scores:
//   uniform (SnapKV, PyramidKV with Bs_l):  B_h = min(Bs, n)
//   adaptive (Ada-KV): c_h = head h's share of the global top-(Hkv * Bs); B_h = round((1 - alpha) c_h
//     + floor(alpha Bs)) clamped to [0, n], then the exact-sum fix-up of ada_allocate
//   each head keeps its own top-B_h (two-stage: the top floor(B_h/2) by S, the rest by crit among
//   the others), plus the window n .. L-1.
// Order everywhere: higher score, then lower head, then lower position (ties are common: max
// pooling makes plateaus).
//
// How: one stable radix sort of all Hkv * n scores (keys = order-preserving bits of -score) gives
// the global order; a stable sort of that order by head gives every head's own ranking with each
// entry's global rank. Ada's c_h are then counts of ranks below Hkv * Bs, and the fix-up compares
// global ranks -- the host's (score, head, position) comparison exactly. Flags of the chosen
// entries and an exclusive scan give the ascending keep lists. Two-stage: one more stable sort
// per head by crit with the stage-one entries pushed last.
//
// Use: create() once (workspace for Hkv * max_length candidates), then select() per layer:
// asynchronous on `stream`, no allocation, no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "core/status.h"

namespace adakv::cuda {

struct KeepSelectorOptions {
  int32_t num_kv_heads = 0;  // Hkv, 1..256
  int32_t max_length = 0;    // longest row L
};

struct SelectInputs {
  const float* scores = nullptr;  // [Hkv][scores_stride] device: S of the n = max(0, L - w) candidates
  int64_t scores_stride = 0;
  const float* crit = nullptr;    // [Hkv][crit_stride] device: CriticalKV second-stage score (two_stage only)
  int64_t crit_stride = 0;
  int32_t length = 0;             // L: entries of every row of the layer
  int32_t window = 0;             // w
  int32_t selection_budget = 0;   // Bs (B - w, or the pyramid Bs_l); values < 0 count as 0
  bool adaptive = false;          // Ada-KV allocation
  double alpha = 0.2;             // Ada-KV safeguard
  bool two_stage = false;         // CriticalKV selection
};

struct SelectOutputs {
  int32_t* keep = nullptr;         // [Hkv][keep_stride] device: kept entry indices, ascending; keep_stride >= L
  int64_t keep_stride = 0;
  int32_t* keep_counts = nullptr;  // [Hkv] device: entries kept (B_h + window)
  int32_t* budgets = nullptr;      // [Hkv] device, optional: B_h (window excluded)
  int32_t* counts = nullptr;       // [Hkv] device, optional: Ada's c_h (adaptive and compressing; else n)
};

class KeepSelector {
 public:
  static Expected<std::unique_ptr<KeepSelector>> create(const KeepSelectorOptions& options);
  ~KeepSelector();
  KeepSelector(const KeepSelector&) = delete;
  KeepSelector& operator=(const KeepSelector&) = delete;

  Status select(const SelectInputs& in, const SelectOutputs& out, cudaStream_t stream);

  const KeepSelectorOptions& options() const { return options_; }

 private:
  KeepSelector() = default;

  KeepSelectorOptions options_;
  int64_t max_items_ = 0;  // Hkv * max_length
  void* workspace_ = nullptr;
  size_t temp_bytes_ = 0;     // CUB temporary storage
  void* temp_ = nullptr;
  uint64_t* keys64_ = nullptr;      // [items] stage-two keys
  uint64_t* keys64_out_ = nullptr;  // [items]
  uint32_t* keys_ = nullptr;        // [items]
  uint32_t* keys_out_ = nullptr;    // [items]
  int32_t* values_ = nullptr;       // [items]
  int32_t* order_ = nullptr;        // [items] flat index (h * n + j) of global rank r
  int32_t* ranked_ = nullptr;       // [Hkv][n] global ranks of head h's entries, best first
  int32_t* flags_ = nullptr;        // [items] 1 = kept
  int32_t* scan_ = nullptr;         // [items] exclusive sum of flags
  int32_t* head_info_ = nullptr;    // [4][Hkv] counts | budgets | stage-one take | stage-two take
};

}  // namespace adakv::cuda
