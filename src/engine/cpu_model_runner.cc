// The CPU ModelRunner: Transformer::forward once per item (each forward already spreads its
// matrix products over every core), one fp32 CpuKvStorage pool, one KvCompressor holding every
// sequence's own config, and one CompressionObserver per live sequence.
#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>

#include "compress/kv_compressor.h"
#include "core/check.h"
#include "engine/compression_observer.h"
#include "engine/model_runner.h"
#include "kv/cpu_kv_storage.h"
#include "model/transformer.h"

namespace adakv {

const char* step_phase_name(StepPhase p) {
  switch (p) {
    case StepPhase::kPrefillPart: return "prefill-part";
    case StepPhase::kPrefillLast: return "prefill-last";
    case StepPhase::kAppend: return "append";
    case StepPhase::kDecode: return "decode";
  }
  return "?";
}

namespace {

CompressionObserver::Phase observer_phase(StepPhase p) {
  switch (p) {
    case StepPhase::kPrefillPart: return CompressionObserver::Phase::kPrefillPart;
    case StepPhase::kPrefillLast: return CompressionObserver::Phase::kPrefill;
    case StepPhase::kAppend: return CompressionObserver::Phase::kAppend;
    case StepPhase::kDecode: return CompressionObserver::Phase::kDecode;
  }
  return CompressionObserver::Phase::kDecode;
}

class CpuModelRunner final : public ModelRunner {
 public:
  CpuModelRunner(std::unique_ptr<Transformer> model, const KvLayout& layout, int64_t num_pages)
      : model_(std::move(model)),
        manager_(layout, num_pages),
        storage_(layout, num_pages),
        compressor_(CompressConfig{}, layout, static_cast<int32_t>(model_->config().num_heads), storage_.num_slots()) {}

  const ModelConfig& config() const override { return model_->config(); }
  const std::string& model_dir() const override { return model_->dir(); }
  int64_t context_length() const override { return model_->context_length(); }
  int64_t kv_bytes_per_page() const override { return bytes_per_page(manager_.layout()); }
  const KvCacheManager& kv() const override { return manager_; }

  static int64_t bytes_per_page(const KvLayout& l) {
    return static_cast<int64_t>(l.page_size) * l.head_dim * 2 * static_cast<int64_t>(sizeof(float));
  }

  Expected<SeqId> add_sequence(const CompressConfig& compress) override {
    if (policy_is_two_stage(compress.policy) && !o_proj_.has_value()) {
      // CriticalKV projects values through o_proj: loaded in fp32 on first use only.
      ADAKV_ASSIGN_OR_RETURN(std::vector<std::vector<float>> o, load_o_proj(model_->dir(), model_->config()));
      o_proj_.emplace(std::move(o));
    }
    const SeqId seq = manager_.add_sequence();
    compressor_.set_config(seq, compress);
    if (static_cast<size_t>(seq) >= observers_.size()) observers_.resize(static_cast<size_t>(seq) + 1);
    if (policy_compresses(compress.policy)) {
      observers_[static_cast<size_t>(seq)] = std::make_unique<CompressionObserver>(
          compressor_, model_->config(), manager_, storage_, seq, o_proj_.has_value() ? &*o_proj_ : nullptr);
    }
    return seq;
  }

  void release_sequence(SeqId seq) override {
    ADAKV_CHECK(manager_.has_sequence(seq), "release of an unknown sequence");
    observers_[static_cast<size_t>(seq)].reset();
    compressor_.on_release(seq);
    manager_.release(seq);
  }

  void step(std::span<const StepItem> items, StepResult* out) override {
    const int64_t vocab = model_->config().vocab_size;
    out->status.assign(items.size(), Status::ok());
    out->logits_row.assign(items.size(), -1);
    int32_t rows = 0;
    for (size_t i = 0; i < items.size(); ++i)
      if (items[i].need_logits) out->logits_row[i] = rows++;
    out->logits.resize(static_cast<size_t>(rows) * static_cast<size_t>(vocab));
    for (size_t i = 0; i < items.size(); ++i) {
      const StepItem& it = items[i];
      CompressionObserver* obs = observers_[static_cast<size_t>(it.seq)].get();
      ForwardOptions fwd;
      fwd.observer = obs;
      if (obs != nullptr) obs->begin_step(observer_phase(it.phase), static_cast<int64_t>(it.tokens.size()));
      Status s = model_->forward(it.tokens, KvContext{&manager_, &storage_, it.seq}, fwd, &logits_);
      if (s.is_ok() && obs != nullptr) s = obs->end_step();
      if (!s.is_ok()) {
        out->status[i] = s;
        continue;
      }
      if (it.need_logits) {
        std::copy(logits_.end() - vocab, logits_.end(),
                  out->logits.begin() + static_cast<int64_t>(out->logits_row[i]) * vocab);
      }
    }
  }

  int64_t compress_now(SeqId seq) override {
    if (!policy_is_continual(compressor_.config(seq).policy)) return 0;
    return compressor_.compress_now(manager_, storage_, seq);
  }

 private:
  std::unique_ptr<Transformer> model_;
  KvCacheManager manager_;
  CpuKvStorage storage_;
  KvCompressor compressor_;  // default config full; each sequence gets its own
  std::optional<std::vector<std::vector<float>>> o_proj_;  // [layers][hidden][H * head_dim]
  std::vector<std::unique_ptr<CompressionObserver>> observers_;  // [seq ids], null: full cache
  std::vector<float> logits_;  // [vocab] scratch
};

}  // namespace

Expected<std::unique_ptr<ModelRunner>> create_cpu_model_runner(const std::string& model_dir,
                                                               const CpuRunnerOptions& options) {
  if (options.page_size <= 0 || options.page_size > 4096)
    return invalid_argument("page size " + std::to_string(options.page_size) + " is out of range: allowed [1, 4096]");
  if (options.kv_pages < 0) return invalid_argument("kv pages must be >= 0 (0: from the KV memory limit)");
  if (options.kv_memory_bytes < 0) return invalid_argument("KV memory must be >= 0 bytes (0: 1 GiB)");
  ADAKV_ASSIGN_OR_RETURN(std::unique_ptr<Transformer> model, Transformer::load(model_dir));
  const KvLayout layout = model->kv_layout(options.page_size);
  const int64_t page_bytes = CpuModelRunner::bytes_per_page(layout);
  int64_t pages = options.kv_pages;
  if (pages == 0) {
    const int64_t bytes = options.kv_memory_bytes > 0 ? options.kv_memory_bytes : (int64_t{1} << 30);
    pages = bytes / page_bytes;
    if (pages == 0) {
      return invalid_argument("KV memory of " + std::to_string(bytes) + " bytes is less than one page (" +
                              std::to_string(page_bytes) + " bytes: " + std::to_string(layout.page_size) +
                              " tokens x head_dim " + std::to_string(layout.head_dim) + " x K and V x fp32)");
    }
  }
  // Slots are int64 but the manager's row ids and the forward's entry indices are int32.
  if (pages > (int64_t{1} << 31) / layout.page_size)
    return invalid_argument("a KV pool of " + std::to_string(pages) + " pages is too large for int32 entry indices");
  return std::unique_ptr<ModelRunner>(new CpuModelRunner(std::move(model), layout, pages));
}

}  // namespace adakv
