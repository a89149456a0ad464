// The forward pass of Llama-family checkpoints (Llama 2/3, Mistral, Qwen2, Qwen3) on the CPU in
// fp32, over the per-head paged KV cache: one shared block structure, with the family
// differences (q/k/v bias, o bias, Qwen3's per-head q/k RMSNorm, tied embeddings, RoPE scaling)
// as data from the config.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/safetensors.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"
#include "model/layer_observer.h"
#include "model/model_config.h"
#include "model/model_weights.h"

namespace adakv {

// The cache one sequence's step reads and appends to.
struct KvContext {
  KvCacheManager* manager = nullptr;
  CpuKvStorage* storage = nullptr;
  SeqId seq = -1;
};

struct ForwardOptions {
  bool all_logits = false;            // logits of every token of the step, else of the last only
  LayerObserver* observer = nullptr;  // optional, see layer_observer.h
};

class Transformer {
 public:
  // config.json (+ generation_config.json) and the safetensors of `model_dir`.
  static Expected<std::unique_ptr<Transformer>> load(const std::string& model_dir);

  const ModelConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  // Longest sequence the model may see: max_position_embeddings, or sliding_window when that
  // is smaller (attention beyond the window would need a sliding mask we do not implement).
  int64_t context_length() const;
  KvLayout kv_layout(int32_t page_size) const;
  const std::vector<float>& rope_inv_freq() const { return inv_freq_; }  // [head_dim / 2]
  int64_t owned_weight_bytes() const { return weights_.has_value() ? weights_->owned_bytes() : 0; }

  // Appends `tokens` to kv.seq at its logical length: reserves and commits one entry per token
  // in every (layer, kv head) row, writes post-RoPE keys, values and token positions, attends
  // each KV head over its own entries, and writes logits [rows][vocab] (rows = n with
  // options.all_logits, else 1: the last token). Fails without touching the cache when a
  // token id is out of range, the context would be exceeded or the pool has too few pages.
  Status forward(std::span<const int32_t> tokens, const KvContext& kv, const ForwardOptions& options,
                 std::vector<float>* logits) const;

 private:
  Transformer() = default;

  std::string dir_;
  ModelConfig config_;
  std::optional<Checkpoint> checkpoint_;  // the mapping that fp32 weights point into
  std::optional<ModelWeights> weights_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
};

}  // namespace adakv
