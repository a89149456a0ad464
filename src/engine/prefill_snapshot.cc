#include "engine/prefill_snapshot.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>

#include "model/layer_observer.h"

namespace adakv {

namespace {

// Keeps the last `num_queries` queries of every layer, and copies the manager when the last
// layer has attended (the storage is not written after that point of the forward).
class RecordingObserver : public LayerObserver {
 public:
  RecordingObserver(PrefillSnapshot& snap, const KvCacheManager& manager, int32_t num_layers)
      : snap_(snap), manager_(manager), num_layers_(num_layers) {}

  void on_layer_queries(const LayerQueries& q) override {
    if (q.seq != snap_.seq) return;
    const int64_t stride = q.num_heads * q.head_dim;
    const int64_t k = std::min<int64_t>(snap_.num_queries, q.n);
    std::vector<float>& out = snap_.queries[static_cast<size_t>(q.layer)];
    out.assign(q.q.begin() + (q.n - k) * stride, q.q.begin() + q.n * stride);
    if (q.layer == num_layers_ - 1) snap_.manager.emplace(manager_);
  }

 private:
  PrefillSnapshot& snap_;
  const KvCacheManager& manager_;
  int32_t num_layers_;
};

}  // namespace

int32_t max_queries_needed(const Transformer& model, std::span<const CompressConfig* const> configs,
                           int32_t prompt_length) {
  const KvLayout layout = model.kv_layout(16);
  int32_t n = 0;
  for (const CompressConfig* c : configs) {
    if (c == nullptr || !policy_compresses(c->policy) || !validate_compress_config(*c).is_ok()) continue;
    const KvCompressor probe(*c, layout, static_cast<int32_t>(model.config().num_heads), /*num_slots=*/0);
    n = std::max(n, probe.queries_needed(prompt_length));
  }
  return n;
}

Expected<PrefillSnapshot> capture_prefill(const Transformer& model, std::span<const int32_t> tokens,
                                          int64_t capacity_tokens, int32_t page_size, int32_t num_queries) {
  if (tokens.empty()) return invalid_argument("the prompt is empty (no tokens)");
  if (page_size <= 0) return invalid_argument("the KV page size must be > 0");
  const auto start = std::chrono::steady_clock::now();
  // The pool generate() would make for this request (same page ids, same free-stack order).
  const KvLayout layout = model.kv_layout(page_size);
  const int64_t capacity = std::max<int64_t>(capacity_tokens, static_cast<int64_t>(tokens.size()));
  const int64_t pages_per_row = (capacity + page_size - 1) / page_size;
  const int64_t num_pages = pages_per_row * layout.num_layers * layout.num_kv_heads;
  KvCacheManager manager(layout, num_pages);
  PrefillSnapshot snap;
  snap.storage.emplace(layout, num_pages);
  snap.seq = manager.add_sequence();
  snap.tokens = static_cast<int64_t>(tokens.size());
  snap.num_queries = static_cast<int32_t>(std::min<int64_t>(std::max(num_queries, 0), snap.tokens));
  snap.queries.resize(static_cast<size_t>(layout.num_layers));

  RecordingObserver recorder(snap, manager, layout.num_layers);
  ForwardOptions fwd;
  fwd.observer = &recorder;
  const KvContext kv{&manager, &*snap.storage, snap.seq};
  ADAKV_RETURN_IF_ERROR(model.forward(tokens, kv, fwd, &snap.logits));
  if (!snap.manager.has_value()) return internal_error("prefill snapshot: the last layer was never observed");
  snap.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return snap;
}

Expected<std::unique_ptr<ReplayedPrefill>> replay_prefill(const Transformer& model, const PrefillSnapshot& snapshot,
                                                          const CompressConfig* config,
                                                          const std::vector<std::vector<float>>* o_proj,
                                                          LayerScoreCache* score_cache) {
  if (!snapshot.manager.has_value() || !snapshot.storage.has_value()) {
    return invalid_argument("replay_prefill: empty snapshot");
  }
  auto r = std::make_unique<ReplayedPrefill>(*snapshot.manager, *snapshot.storage);
  r->seq = snapshot.seq;
  KvCacheManager& m = r->manager;
  CpuKvStorage& st = r->storage;
  const ModelConfig& mc = model.config();
  const bool compress = config != nullptr && policy_compresses(config->policy);
  if (compress) {
    ADAKV_RETURN_IF_ERROR(validate_compress_config(*config));
    r->compressor =
        std::make_unique<KvCompressor>(*config, m.layout(), static_cast<int32_t>(mc.num_heads), st.num_slots());
    KvCompressor& comp = *r->compressor;
    const bool two_stage = policy_is_two_stage(config->policy);
    if (two_stage && o_proj == nullptr) {
      return invalid_argument(std::string(kv_policy_name(config->policy)) + " needs o_proj");
    }
    const int64_t qstride = mc.num_heads * mc.head_dim;
    r->plans.assign(static_cast<size_t>(mc.num_layers), LayerPlan{});
    // As CompressionObserver::on_layer_queries does for a kPrefill step, layer by layer.
    for (int32_t layer = 0; layer < static_cast<int32_t>(mc.num_layers); ++layer) {
      const int32_t row_length = m.length(r->seq, layer, 0);
      const int32_t k = std::min<int32_t>(comp.queries_needed(row_length), static_cast<int32_t>(snapshot.tokens));
      if (k > snapshot.num_queries) {
        return internal_error("prefill snapshot: " + std::string(kv_policy_name(config->policy)) + " needs the last " +
                              std::to_string(k) + " queries, " + std::to_string(snapshot.num_queries) +
                              " were recorded");
      }
      const float* last =
          snapshot.queries[static_cast<size_t>(layer)].data() + (snapshot.num_queries - k) * qstride;
      const float* o = two_stage ? (*o_proj)[static_cast<size_t>(layer)].data() : nullptr;
      const int32_t hidden = static_cast<int32_t>(mc.hidden_size);
      ADAKV_ASSIGN_OR_RETURN(LayerPlan plan,
                             score_cache != nullptr
                                 ? comp.after_prefill_layer(m, st, r->seq, layer, last, k, o, hidden, *score_cache)
                                 : comp.after_prefill_layer(m, st, r->seq, layer, last, k, o, hidden));
      r->plans[static_cast<size_t>(layer)] = std::move(plan);
    }
    m.advance_logical_length(r->seq, snapshot.tokens);
    comp.after_prefill(m, st, r->seq);
  } else {
    m.advance_logical_length(r->seq, snapshot.tokens);
  }
  return r;
}

}  // namespace adakv
