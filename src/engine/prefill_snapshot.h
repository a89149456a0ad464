// One full-cache prefill shared by every compression config of a sweep (adakv eval).
//
// The prefill is policy-independent: layer l is compressed after its attention over the full
// prompt, and no later computation of the prefill reads what layer l's cache keeps. So the
// prompt is prefilled once with the full cache while a recording observer keeps, per layer,
// the last post-RoPE queries the compressors will need, and the cache is snapshotted at the
// exact point where a compressing prefill would have compressed the last layer (after its
// attention, before the forward advances the logical length). For each config the snapshot is
// copied and the compressor's prefill hooks are replayed in CompressionObserver's order:
//
//   for each layer l: after_prefill_layer(l, last queries_needed(L) queries of l, o_proj[l])
//   advance_logical_length(seq, L);  after_prefill
//
// after_prefill_layer(l) reads and writes only layer l's rows (and their slots' metric), the
// pages it frees go back to the free stack in the same order, and no page is allocated between
// the layers of a prefill (the forward commits every row before layer 0), so the replayed cache
// is the one generate() ends its prefill with, page for page. The prefill's last-position logits
// are computed from full-cache hidden states in both paths, so they are equal as well.
// continue_generation() (engine/generator.h) then takes over: the question append (protocol
// after) and the greedy decode with the compressor's decode hooks.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "compress/compress_config.h"
#include "compress/kv_compressor.h"
#include "compress/policy.h"
#include "core/status.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"
#include "model/transformer.h"

namespace adakv {

struct PrefillSnapshot {
  // The cache after the last layer's K/V write and attention: every row of every layer holds
  // the prefilled tokens; the logical length is not advanced yet (as when a compressing
  // prefill compresses its last layer).
  std::optional<KvCacheManager> manager;
  std::optional<CpuKvStorage> storage;
  SeqId seq = -1;
  int64_t tokens = 0;                       // tokens prefilled (L)
  int32_t num_queries = 0;                  // trailing queries recorded per layer
  std::vector<std::vector<float>> queries;  // [layers][num_queries][H][head_dim], post-RoPE
  std::vector<float> logits;                // [vocab] of the last prefilled position
  double seconds = 0.0;                     // the prefill's wall time
};

// The trailing queries every config of `configs` needs for a prefill of `prompt_length` (the
// largest KvCompressor::queries_needed; configs that do not compress or fail validation count 0).
int32_t max_queries_needed(const Transformer& model, std::span<const CompressConfig* const> configs,
                           int32_t prompt_length);

// Prefills `tokens` with the full cache into a pool sized as generate() sizes it for a request
// of `capacity_tokens` tokens (prompt + max new tokens) with `page_size`, keeping the last
// `num_queries` queries of every layer.
Expected<PrefillSnapshot> capture_prefill(const Transformer& model, std::span<const int32_t> tokens,
                                          int64_t capacity_tokens, int32_t page_size, int32_t num_queries);

// A copy of the snapshot's cache, compressed by one config.
struct ReplayedPrefill {
  ReplayedPrefill(const KvCacheManager& m, const CpuKvStorage& s) : manager(m), storage(s) {}
  KvCacheManager manager;
  CpuKvStorage storage;
  SeqId seq = -1;
  std::unique_ptr<KvCompressor> compressor;  // null for the full cache
  std::vector<LayerPlan> plans;              // [layers] when compressing
};

// Copies the snapshot and replays the prefill hooks of `config` (null or full: no compression).
// `o_proj` ([layers][hidden][H*d]) is required by the two-stage policies. `score_cache`, if
// given, must belong to this snapshot alone (and one o_proj): every layer's scores are taken
// from it or computed once and stored there (KvCompressor's cached after_prefill_layer), so
// configs that differ only in budget or allocation (score_key) score each layer once; the
// replayed cache is the same either way. Errors: the config is invalid, the snapshot recorded
// too few queries, a layer's compression failed.
Expected<std::unique_ptr<ReplayedPrefill>> replay_prefill(const Transformer& model, const PrefillSnapshot& snapshot,
                                                          const CompressConfig* config,
                                                          const std::vector<std::vector<float>>* o_proj,
                                                          LayerScoreCache* score_cache = nullptr);

}  // namespace adakv
