// KvCompressor: runs a compression policy against the paged cache (KvCacheManager) and the CPU
// KV storage. This is what the forward pass and the engine call; the decisions themselves are the
// pure functions of policy.h / kvcompress.h. Call sequence (docs/compression.md):
//
//   prefill of seq (prompt of L tokens, rows of every layer already committed with L entries):
//     for each layer l:  write K/V of l  ->  attention of l  ->
//                        compressor.after_prefill_layer(m, st, seq, l, q_l, nq)  (compresses l now)
//     m.advance_logical_length(seq, L);  compressor.after_prefill(m, st, seq)  (KV-Compress)
//   each decode step (one token):
//     reserve/commit 1 entry  ->  compressor.on_append(m, seq, 1)  ->
//     for each layer l: write K/V, attention, compressor.observe_decode(m, st, seq, l, q_l)
//     m.advance_logical_length(seq, 1);  compressor.after_decode_step(m, st, seq)
//
// Per-entry metrics (H2O accumulated attention, the KV-Compress metric) live in a slot-indexed
// array next to K/V, so compaction moves carry them with the entry.
//
// Per-sequence configs: the constructor's config is the default; set_config(seq, c) gives one
// sequence its own policy (the engine serves requests with different policies from one pool).
// Every call about a sequence uses that sequence's config; the metric array is shared (slots
// belong to one sequence at a time) and allocated once any sequence needs a metric.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <tuple>
#include <vector>

#include "compress/compress_config.h"
#include "compress/policy.h"
#include "core/status.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"

namespace adakv {

// Layer scores kept for reuse: compressing the same prefilled rows with several configs (a sweep
// over budgets and policies) computes each (layer, score_key, query count) once. Scores are a
// function of the rows and queries the layer holds at its after_prefill_layer, which this cache
// cannot see: the caller owns it and uses one cache per prefill (the same tokens in the same
// rows, the same recorded queries, the same o_proj), e.g. one per PrefillSnapshot. Not
// thread-safe.
class LayerScoreCache {
 public:
  const LayerScores* find(int32_t layer, const ScoreKey& key, int32_t num_queries) const;
  const LayerScores& insert(int32_t layer, const ScoreKey& key, int32_t num_queries, LayerScores scores);
  size_t size() const { return entries_.size(); }
  int64_t hits() const { return hits_; }      // find() calls that found an entry
  int64_t misses() const { return misses_; }  // and that did not
  void clear() { entries_.clear(); }

 private:
  std::map<std::tuple<int32_t, ScoreKey, int32_t>, LayerScores> entries_;
  mutable int64_t hits_ = 0, misses_ = 0;
};

class KvCompressor {
 public:
  // `config` must pass validate_compress_config; num_slots = the storage's slots.
  KvCompressor(const CompressConfig& config, const KvLayout& layout, int32_t num_heads, int64_t num_slots);

  // The default config (sequences without their own).
  const CompressConfig& config() const { return config_; }
  // Gives `seq` its own config (must pass validate_compress_config) until on_release(seq).
  void set_config(SeqId seq, const CompressConfig& config);
  // The config `seq` is compressed with: its own, else the default.
  const CompressConfig& config(SeqId seq) const;
  // Trailing prompt queries after_prefill_layer needs for a prompt of `prompt_length`
  // (H2O: all of them; window policies: w; others: 0), for the default config or seq's.
  int32_t queries_needed(int32_t prompt_length) const;
  int32_t queries_needed(SeqId seq, int32_t prompt_length) const;

  // Right after layer `layer` of `seq` finished its prefill: the layer's rows hold the prompt
  // (any previously kept entries first, the new tokens last). queries: [num_queries][H][head_dim]
  // post-RoPE queries of the last num_queries tokens (>= queries_needed). o_proj: [hidden][H *
  // head_dim] fp32, CriticalKV only. Window policies, H2O, random and StreamingLLM compress the
  // layer's rows now; KV-Compress only records its metric. Returns what was decided (for
  // `adakv inspect`); plan.compressed is false when nothing was evicted.
  Expected<LayerPlan> after_prefill_layer(KvCacheManager& m, CpuKvStorage& st, SeqId seq, int32_t layer,
                                          const float* queries, int32_t num_queries, const float* o_proj = nullptr,
                                          int32_t hidden_size = 0);
  // The same, with the scores looked up in `cache` under (layer, score_key(config(seq)),
  // num_queries) and computed (layer_scores) and stored there on a miss. Gives what the call
  // above gives when the cache holds scores of this prefill only (LayerScoreCache).
  Expected<LayerPlan> after_prefill_layer(KvCacheManager& m, CpuKvStorage& st, SeqId seq, int32_t layer,
                                          const float* queries, int32_t num_queries, const float* o_proj,
                                          int32_t hidden_size, LayerScoreCache& cache);
  // The same from scores computed before: what layer_scores returned for this layer's current
  // rows under seq's config or one with an equal score_key. Fails when they do not fit the rows
  // (lengths, heads, a score array the policy needs missing or of the wrong size).
  Expected<LayerPlan> after_prefill_layer(KvCacheManager& m, CpuKvStorage& st, SeqId seq, int32_t layer,
                                          const LayerScores& scores);
  // The scores after_prefill_layer computes for layer `layer` of seq (its rows as they are now,
  // arguments as there); changes nothing. Full and StreamingLLM: the row lengths only.
  Expected<LayerScores> layer_scores(const KvCacheManager& m, const CpuKvStorage& st, SeqId seq, int32_t layer,
                                     const float* queries, int32_t num_queries, const float* o_proj = nullptr,
                                     int32_t hidden_size = 0) const;
  // After the last layer's prefill (and advance_logical_length): KV-Compress frees blocks across
  // all layers and heads down to its budget. Returns pages freed.
  int64_t after_prefill(KvCacheManager& m, CpuKvStorage& st, SeqId seq);

  // After commit() appended `new_entries` to every row of seq: their metric starts at zero.
  void on_append(const KvCacheManager& m, SeqId seq, int32_t new_entries);
  // Decode: layer `layer` attended with query [H][head_dim] (post-RoPE) over its rows, the new
  // token included. H2O and KV-Compress accumulate; other policies ignore it.
  void observe_decode(const KvCacheManager& m, const CpuKvStorage& st, SeqId seq, int32_t layer, const float* query);
  // The same from probabilities the forward pass already has: probs [group][length] over the
  // row's entries in entry order, for the group's query heads.
  void add_attention(const KvCacheManager& m, SeqId seq, int32_t layer, int32_t kv_head, const float* probs);
  // After each decode step of seq: continual policies compress every `interval` steps.
  int64_t after_decode_step(KvCacheManager& m, CpuKvStorage& st, SeqId seq);
  // Continual policies, now (e.g. rather than preempting seq). Returns pages freed.
  int64_t compress_now(KvCacheManager& m, CpuKvStorage& st, SeqId seq);
  // Forget per-sequence state, its own config included (call with KvCacheManager::release).
  void on_release(SeqId seq);

  // The per-entry metric at a slot (0 for policies that keep none).
  float metric(KvSlot s) const { return metric_.empty() ? 0.0f : metric_[static_cast<size_t>(s)]; }

 private:
  // Gathers a row's keys (or values) into [length][head_dim].
  void gather_row(const KvCacheManager& m, const CpuKvStorage& st, SeqId seq, int32_t layer, int32_t kv_head,
                  bool values, std::vector<float>& out) const;
  void apply_keep(KvCacheManager& m, CpuKvStorage& st, SeqId seq, const LayerPlan& plan);
  void apply_moves(CpuKvStorage& st, std::span<const KvMove> moves);
  // Allocates the metric array when policy `p` keeps a per-entry metric.
  void ensure_metric(KvPolicy p);
  bool has_metric(const CompressConfig& c) const {
    return !metric_.empty() && (c.policy == KvPolicy::kH2o || c.policy == KvPolicy::kKvCompress);
  }
  int64_t compress_h2o(KvCacheManager& m, CpuKvStorage& st, SeqId seq);
  int64_t compress_streaming(KvCacheManager& m, CpuKvStorage& st, SeqId seq);
  int64_t compress_kvcompress(KvCacheManager& m, CpuKvStorage& st, SeqId seq);

  CompressConfig config_;  // the default
  KvLayout layout_;
  int32_t num_heads_;
  int32_t group_;
  int64_t num_slots_;
  std::vector<std::optional<CompressConfig>> seq_config_;  // [seq ids] own config, if any
  std::vector<float> metric_;        // [num_slots] per-entry metric (H2O, KV-Compress); empty until needed
  std::vector<int64_t> decode_steps_;  // [seq ids] decode steps since prefill
};

}  // namespace adakv
