// CompressionObserver: the LayerObserver that drives a KvCompressor from inside the forward pass,
// following the call sequence of compress/kv_compressor.h. The caller brackets every forward
// step of its sequence with begin_step / end_step and says what the step is:
//   kPrefill  the prompt (or the context), or its last chunk: each layer is compressed right
//             after its attention with the layer's last queries_needed post-RoPE queries (+ o_proj
//             for CriticalKV); end_step runs after_prefill (KV-Compress's cross-layer eviction).
//   kPrefillPart  a chunk of the prompt that is not the last (chunked prefill): nothing is
//             compressed, the rows stay complete; the layer's trailing queries that the last
//             chunk's compression will need are kept (H2O: all of them), so the final plan
//             equals that of a one-step prefill.
//   kAppend   tokens appended to an already compressed cache (a question after a compressed
//             context): nothing is compressed again; per-entry metrics of the new entries start
//             at zero (H2O / KV-Compress), and the step's last query is observed.
//   kDecode   one token: on_append, observe_decode per layer, after_decode_step (continual
//             policies compress every `interval` steps).
// Calls are forwarded to `next` (a fidelity tap, say) after the compressor has run.
#pragma once

#include <cstdint>
#include <vector>

#include "compress/kv_compressor.h"
#include "compress/policy.h"
#include "core/status.h"
#include "model/layer_observer.h"
#include "model/transformer.h"

namespace adakv {

// The fp32 o_proj of every layer ([layers] -> [hidden][H * head_dim]), which CriticalKV's second
// stage projects values through; read from the checkpoint of `model_dir`.
Expected<std::vector<std::vector<float>>> load_o_proj(const std::string& model_dir, const ModelConfig& config);

// What the cache of one sequence holds now.
struct KvCacheStats {
  int64_t entries = 0;        // entries held, summed over layers and kv heads
  int64_t full_entries = 0;   // what the full cache would hold: logical length x rows
  int64_t pages_used = 0;
  int64_t full_pages = 0;     // pages the full cache would use
  double compression_ratio() const { return entries > 0 ? static_cast<double>(full_entries) / entries : 0.0; }
};
KvCacheStats kv_cache_stats(const KvCacheManager& m, SeqId seq);

class CompressionObserver : public LayerObserver {
 public:
  enum class Phase { kPrefill, kPrefillPart, kAppend, kDecode };

  // `o_proj` ([layers] -> [hidden][H * head_dim]) is needed for the two-stage policies only and
  // must outlive the observer; so must every other argument.
  CompressionObserver(KvCompressor& compressor, const ModelConfig& config, KvCacheManager& manager,
                      CpuKvStorage& storage, SeqId seq, const std::vector<std::vector<float>>* o_proj = nullptr,
                      LayerObserver* next = nullptr);

  // Before the forward of a step of `n` tokens. A kPrefill step on a cache that already went
  // through a prefill is treated as kAppend (a compressed context is never compressed twice).
  void begin_step(Phase phase, int64_t n);
  // After the forward returned: the sequence-level part of the step. Returns the first error a
  // layer's compression met during the step.
  Status end_step();

  void on_layer_queries(const LayerQueries& q) override;
  void on_attention_output(const LayerAttentionOutput& a) override;

  // The plans of the last prefill, one per layer (kept counts, budgets, Ada counts).
  const std::vector<LayerPlan>& plans() const { return plans_; }
  bool prefilled() const { return prefilled_; }
  int64_t pages_freed() const { return pages_freed_; }

 private:
  KvCompressor& compressor_;
  const ModelConfig& config_;
  KvCacheManager& manager_;
  CpuKvStorage& storage_;
  SeqId seq_;
  const std::vector<std::vector<float>>* o_proj_;
  LayerObserver* next_;

  Phase phase_ = Phase::kPrefill;
  int64_t step_tokens_ = 0;
  bool prefilled_ = false;  // a prefill step has completed: later multi-token steps are appends
  Status error_;
  std::vector<LayerPlan> plans_;  // [layers]
  int64_t pages_freed_ = 0;
  // Chunked prefill: the trailing post-RoPE queries of the chunks so far, per layer, at most
  // queries_needed(any length) of them (window policies: w; H2O: all).
  std::vector<std::vector<float>> stash_;  // [layers][stashed tokens][H][head_dim]
  std::vector<float> joined_;              // [stash + step tokens][H][head_dim] scratch
};

}  // namespace adakv
