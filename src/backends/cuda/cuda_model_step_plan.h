// The host's description of one CudaModel::step, built before anything is enqueued and read by
// every phase after it (cuda_model_step_prepare.cc builds it, cuda_model_forward.cc enqueues the
// forward from it, cuda_model_step.cc runs the phases and hands the results back).
#pragma once

#include <cstdint>
#include <vector>

#include "backends/cuda/cuda_model.h"
#include "compress/policy.h"

namespace adakv::cuda::cuda_model_detail {

// Offsets (int32 elements, 16-byte aligned) of the step's metadata fields in Impl::meta_host and
// meta_dev; `size` is the whole.
struct StepMetaLayout {
  int64_t tokens = 0;  // [T] token ids
  int64_t pos = 0;     // [T] positions
  int64_t tseq = 0;    // [T] each token's sequence (internal order)
  int64_t tidx = 0;    // [T] each token's index within its sequence's tokens
  int64_t sel = 0;     // [R] the tokens whose logits are computed
  int64_t seq = 0;     // [B] sequence ids
  int64_t ntok = 0;    // [B] tokens per sequence
  int64_t rowlen = 0;  // [B][L][Hkv] row lengths after the step's append
  int64_t doff = 0;    // [L][n_dec][Hkv] decode rows' page-table offsets
  int64_t dlen = 0;    // [L][n_dec][Hkv] decode rows' lengths
  int64_t size = 0;
};

// One sequence of the step, in internal order (one-token steps first, so that one decode launch
// covers them).
struct StepSeq {
  const SeqStep* in = nullptr;  // the caller's entry
  int32_t caller = 0;           // its index in the caller's span
  SeqId seq = 0;
  int64_t pos0 = 0;       // logical length before the step
  int32_t tok0 = 0;       // its tokens are [tok0, tok0 + ntok) of the step's T
  int32_t ntok = 0;
  int32_t row_first = 0;  // its first logits row
  bool fresh = false;     // every row holds exactly this step's tokens (a prompt's first chunk)
  bool complete = false;  // every row holds every token (nothing compressed)

  // Compression (plan_step_compression).
  const CompressConfig* comp = nullptr;  // compresses with this step (null: not)
  bool comp_window = false;  // compresses per layer during the forward
  bool comp_keep = false;    // ... with keep lists (all but kvcompress)
  bool kvc_after = false;    // kvcompress: cross-layer selection after the forward
  bool metric_zero = false;  // metric policy: new entries start at 0
  bool metric_obs = false;   // ... and the last query's attention is added
  int32_t metric_mode = 0;
  bool ring_save = false;  // prefill_part of a window policy: its window queries into the ring
  bool h2o_part = false;   // prefill_part of H2O: its share into the metric
  bool want_lse = false;   // H2O prompt steps: prefill attention writes lse
  int32_t comp_slot = -1;  // index into the keep counts / keep regions
  int64_t keep_base = 0;   // its keep lists in keep_dev / keep_host ([rows][total])
  int32_t samp = -1;       // its device sampling row (-1: not sampled)

  int32_t total() const { return static_cast<int32_t>(pos0) + ntok; }  // entries after the step
};

struct StepPlan {
  int32_t B = 0;      // sequences
  int32_t T = 0;      // tokens
  int32_t R = 0;      // logits rows
  int32_t n_dec = 0;  // one-token sequences (internal indices [0, n_dec))
  std::vector<StepSeq> seqs;  // [B] internal order
  StepMetaLayout meta;
  int64_t page_updates = 0;  // page-table entries mirrored this step (pt_host)
  // Compression.
  int32_t n_comp = 0;        // sequences with a compression slot
  bool window_comp = false;  // some sequence leaves keep lists
  int64_t keep_used = 0;     // keep-list entries
  bool any_obs = false;      // some sequence adds its last query's attention to the metric
  float* dec_lse = nullptr;  // decode attention's lse output ([n_dec][H]) when the metric needs it
  int32_t n_samp = 0;        // device sampling rows
};

}  // namespace adakv::cuda::cuda_model_detail
