#include "engine/fidelity.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "compress/kv_compressor.h"
#include "engine/compression_observer.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"

namespace adakv {
namespace {

// Records each layer's attention output of single-token steps into a [layers][q_dim] buffer.
class AttentionTap : public LayerObserver {
 public:
  AttentionTap(int64_t q_dim, int64_t layers) : q_dim_(q_dim), out_(static_cast<size_t>(q_dim * layers)) {}
  void on_attention_output(const LayerAttentionOutput& a) override {
    if (a.n != 1) return;
    std::copy_n(a.out.data(), q_dim_, out_.data() + a.layer * q_dim_);
  }
  const std::vector<float>& out() const { return out_; }

 private:
  int64_t q_dim_;
  std::vector<float> out_;  // [layers][q_dim]
};

int32_t argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace

Expected<FidelityRunner> FidelityRunner::create(const Transformer& model, std::span<const int32_t> tokens,
                                                const FidelityOptions& options) {
  if (options.prompt_length < 1 || options.forced_tokens < 1)
    return invalid_argument("fidelity: prompt length and forced tokens must be >= 1");
  const int64_t need = options.prompt_length + options.forced_tokens;
  if (static_cast<int64_t>(tokens.size()) < need)
    return invalid_argument("fidelity: the text has " + std::to_string(tokens.size()) + " tokens, " +
                            std::to_string(need) + " needed (prompt " + std::to_string(options.prompt_length) +
                            " + forced " + std::to_string(options.forced_tokens) + ")");
  if (need > model.context_length())
    return out_of_range("fidelity: " + std::to_string(need) + " tokens exceed the model's context of " +
                        std::to_string(model.context_length()));
  FidelityRunner r(model, std::vector<int32_t>(tokens.begin(), tokens.begin() + need), options);
  CompressConfig full;
  ADAKV_ASSIGN_OR_RETURN(r.full_, r.trace(full));
  return r;
}

Expected<FidelityRunner::Trace> FidelityRunner::trace(const CompressConfig& config) const {
  const Transformer& model = *model_;
  const ModelConfig& mc = model.config();
  const int64_t n = options_.prompt_length;
  const int64_t m = options_.forced_tokens;
  const KvLayout layout = model.kv_layout(options_.page_size);
  const int64_t pages_per_row = (n + m + options_.page_size - 1) / options_.page_size;
  const int64_t num_pages = pages_per_row * layout.num_layers * layout.num_kv_heads;
  KvCacheManager manager(layout, num_pages);
  CpuKvStorage storage(layout, num_pages);
  const SeqId seq = manager.add_sequence();
  const KvContext kv{&manager, &storage, seq};

  AttentionTap tap(mc.q_dim(), mc.num_layers);
  std::unique_ptr<KvCompressor> compressor;
  std::unique_ptr<CompressionObserver> obs;
  std::vector<std::vector<float>> o_proj;  // [layers][hidden][q_dim]
  ForwardOptions fwd;
  fwd.observer = &tap;
  if (policy_compresses(config.policy)) {
    if (policy_is_two_stage(config.policy)) {
      ADAKV_ASSIGN_OR_RETURN(o_proj, load_o_proj(model.dir(), mc));
    }
    compressor = std::make_unique<KvCompressor>(config, layout, static_cast<int32_t>(mc.num_heads), storage.num_slots());
    obs = std::make_unique<CompressionObserver>(*compressor, mc, manager, storage, seq, &o_proj, &tap);
    fwd.observer = obs.get();
  }
  std::vector<float> logits;  // [vocab]
  auto step = [&](std::span<const int32_t> toks, CompressionObserver::Phase phase) -> Status {
    if (obs) obs->begin_step(phase, static_cast<int64_t>(toks.size()));
    ADAKV_RETURN_IF_ERROR(model.forward(toks, kv, fwd, &logits));
    return obs ? obs->end_step() : Status::ok();
  };

  Trace t;
  ADAKV_RETURN_IF_ERROR(step(std::span<const int32_t>(tokens_.data(), static_cast<size_t>(n)),
                             CompressionObserver::Phase::kPrefill));
  t.kept_fraction = 1.0 / std::max(1e-12, kv_cache_stats(manager, seq).compression_ratio());
  const size_t per_step = static_cast<size_t>(mc.q_dim() * mc.num_layers);
  t.attention.resize(per_step * static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    ADAKV_RETURN_IF_ERROR(step(std::span<const int32_t>(tokens_.data() + n + i, 1), CompressionObserver::Phase::kDecode));
    std::copy(tap.out().begin(), tap.out().end(), t.attention.begin() + static_cast<ptrdiff_t>(per_step * i));
    t.argmax.push_back(argmax(logits));
  }
  return t;
}

Expected<FidelityResult> FidelityRunner::run(const CompressConfig& config) const {
  ADAKV_RETURN_IF_ERROR(validate_compress_config(config));
  ADAKV_ASSIGN_OR_RETURN(Trace t, trace(config));
  const ModelConfig& mc = model_->config();
  const int64_t q_dim = mc.q_dim();
  const int64_t layers = mc.num_layers;
  const int64_t m = options_.forced_tokens;
  FidelityResult r;
  r.config = config;
  r.kept_fraction = t.kept_fraction;
  r.layer_rel_l1.assign(static_cast<size_t>(layers), 0.0);
  int64_t agree = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t l = 0; l < layers; ++l) {
      const size_t off = static_cast<size_t>((i * layers + l) * q_dim);
      double diff = 0.0, norm = 0.0;
      for (int64_t j = 0; j < q_dim; ++j) {
        diff += std::fabs(static_cast<double>(t.attention[off + j]) - full_.attention[off + j]);
        norm += std::fabs(static_cast<double>(full_.attention[off + j]));
      }
      r.layer_rel_l1[static_cast<size_t>(l)] += (norm > 0 ? diff / norm : 0.0) / static_cast<double>(m);
    }
    agree += t.argmax[static_cast<size_t>(i)] == full_.argmax[static_cast<size_t>(i)] ? 1 : 0;
  }
  for (double e : r.layer_rel_l1) r.mean_rel_l1 += e / static_cast<double>(layers);
  r.argmax_agreement = static_cast<double>(agree) / static_cast<double>(m);
  return r;
}

}  // namespace adakv
