#include "engine/compression_observer.h"

#include <algorithm>
#include <limits>
#include <string>

#include "core/dtype.h"
#include "io/safetensors.h"

namespace adakv {

Expected<std::vector<std::vector<float>>> load_o_proj(const std::string& model_dir, const ModelConfig& config) {
  ADAKV_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::open(model_dir));
  const int64_t hidden = config.hidden_size;
  const int64_t q_dim = config.q_dim();
  std::vector<std::vector<float>> out(static_cast<size_t>(config.num_layers));  // [layers][hidden][q_dim]
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const std::string name = "model.layers." + std::to_string(l) + ".self_attn.o_proj.weight";
    ADAKV_ASSIGN_OR_RETURN(const TensorInfo* t, ckpt.get(name, {hidden, q_dim}));
    out[static_cast<size_t>(l)].resize(static_cast<size_t>(hidden * q_dim));
    convert_to_f32(t->dtype, t->data, out[static_cast<size_t>(l)].data(), static_cast<size_t>(hidden * q_dim));
  }
  return out;
}

KvCacheStats kv_cache_stats(const KvCacheManager& m, SeqId seq) {
  const KvLayout& layout = m.layout();
  KvCacheStats s;
  const int64_t logical = m.logical_length(seq);
  const int64_t rows = static_cast<int64_t>(layout.num_layers) * layout.num_kv_heads;
  for (int32_t l = 0; l < layout.num_layers; ++l)
    for (int32_t h = 0; h < layout.num_kv_heads; ++h) s.entries += m.length(seq, l, h);
  s.full_entries = logical * rows;
  s.pages_used = m.sequence_pages(seq);
  s.full_pages = rows * ((logical + layout.page_size - 1) / layout.page_size);
  return s;
}

CompressionObserver::CompressionObserver(KvCompressor& compressor, const ModelConfig& config, KvCacheManager& manager,
                                         CpuKvStorage& storage, SeqId seq,
                                         const std::vector<std::vector<float>>* o_proj, LayerObserver* next)
    : compressor_(compressor),
      config_(config),
      manager_(manager),
      storage_(storage),
      seq_(seq),
      o_proj_(o_proj),
      next_(next) {}

void CompressionObserver::begin_step(Phase phase, int64_t n) {
  const bool prefill = phase == Phase::kPrefill || phase == Phase::kPrefillPart;
  phase_ = (prefill && prefilled_) ? Phase::kAppend : phase;
  step_tokens_ = n;
  error_ = Status::ok();
  if (phase_ == Phase::kPrefill) plans_.assign(static_cast<size_t>(config_.num_layers), LayerPlan{});
}

Status CompressionObserver::end_step() {
  if (!error_.is_ok()) return error_;
  switch (phase_) {
    case Phase::kPrefill:
      pages_freed_ += compressor_.after_prefill(manager_, storage_, seq_);
      prefilled_ = true;
      break;
    case Phase::kPrefillPart:
    case Phase::kAppend:
      break;
    case Phase::kDecode:
      pages_freed_ += compressor_.after_decode_step(manager_, storage_, seq_);
      break;
  }
  return Status::ok();
}

void CompressionObserver::on_layer_queries(const LayerQueries& q) {
  if (q.seq == seq_ && error_.is_ok()) {
    const int64_t qstride = q.num_heads * q.head_dim;
    const KvPolicy policy = compressor_.config(seq_).policy;
    std::vector<float>* stash =
        stash_.empty() ? nullptr : &stash_[static_cast<size_t>(q.layer)];  // [stashed][H][d]
    if (phase_ == Phase::kPrefillPart) {
      // Keep the trailing queries the last chunk's compression may need.
      const int64_t cap = compressor_.queries_needed(seq_, std::numeric_limits<int32_t>::max());
      if (stash_.empty() && cap > 0) {
        stash_.resize(static_cast<size_t>(config_.num_layers));
        stash = &stash_[static_cast<size_t>(q.layer)];
      }
      if (cap > 0) stash->insert(stash->end(), q.q.begin(), q.q.begin() + q.n * qstride);
      const int64_t held = cap > 0 ? static_cast<int64_t>(stash->size()) / qstride : 0;
      if (held > cap) stash->erase(stash->begin(), stash->begin() + (held - cap) * qstride);
    } else if (phase_ == Phase::kPrefill) {
      const int32_t row_length = manager_.length(seq_, q.layer, 0);
      const int64_t stashed = stash == nullptr ? 0 : static_cast<int64_t>(stash->size()) / qstride;
      const int32_t k = static_cast<int32_t>(
          std::min<int64_t>(compressor_.queries_needed(seq_, row_length), stashed + q.n));
      const float* last = q.q.data() + (q.n - std::min<int64_t>(k, q.n)) * qstride;
      if (k > q.n) {  // the last chunk is shorter than the queries needed: prepend earlier chunks'
        joined_.assign(stash->end() - (k - q.n) * qstride, stash->end());
        joined_.insert(joined_.end(), q.q.begin(), q.q.begin() + q.n * qstride);
        last = joined_.data();
      }
      const float* o = nullptr;
      if (policy_is_two_stage(policy)) {
        if (o_proj_ == nullptr) {
          error_ = invalid_argument(std::string(kv_policy_name(policy)) + " needs o_proj");
        } else {
          o = (*o_proj_)[static_cast<size_t>(q.layer)].data();
        }
      }
      if (error_.is_ok()) {
        Expected<LayerPlan> plan = compressor_.after_prefill_layer(manager_, storage_, seq_, q.layer, last, k, o,
                                                                   static_cast<int32_t>(config_.hidden_size));
        if (plan.has_value()) {
          plans_[static_cast<size_t>(q.layer)] = std::move(plan).value();
        } else {
          error_ = plan.status();
        }
      }
      if (stash != nullptr) std::vector<float>().swap(*stash);  // the prefill is over
    } else {
      // The step's new entries (the last step_tokens_ of every row) start with a zero metric; the
      // first layer's call does it for every layer, before any of them is observed.
      if (q.layer == 0) compressor_.on_append(manager_, seq_, static_cast<int32_t>(step_tokens_));
      compressor_.observe_decode(manager_, storage_, seq_, q.layer, q.q.data() + (q.n - 1) * qstride);
    }
  }
  if (next_ != nullptr) next_->on_layer_queries(q);
}

void CompressionObserver::on_attention_output(const LayerAttentionOutput& a) {
  if (next_ != nullptr) next_->on_attention_output(a);
}

}  // namespace adakv
