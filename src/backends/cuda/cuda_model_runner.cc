// CudaModelRunner (cuda_model_runner.h): the scheduler's items -> one cuda::SeqStep each ->
// one CudaModel::step. Items that come with sampling parameters (StepItem::sampling: every
// request today) choose their next token on the device (sampling.h: argmax, or temperature /
// top-k / top-p with the request Sampler's own uniform draw) and only the token ids come back;
// the others get their fp32 logits row copied back for the scheduler's host Sampler.
#include "backends/cuda/cuda_model_runner.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "backends/cuda/cuda_model.h"
#include "compress/policy.h"
#include "core/check.h"
#include "core/mapped_file.h"
#include "model/model_config.h"

namespace adakv {
namespace {

class CudaModelRunner final : public ModelRunner {
 public:
  CudaModelRunner(std::unique_ptr<cuda::CudaModel> model, std::string model_dir, int32_t max_seqs)
      : model_(std::move(model)),
        model_dir_(std::move(model_dir)),
        max_seqs_(max_seqs),
        manager_(model_->kv_layout(), model_->num_pages()),
        configs_(static_cast<size_t>(max_seqs)),
        decode_steps_(static_cast<size_t>(max_seqs), 0) {
    // ADAKV_HOST_SAMPLING=1: every logits row back to the host and the scheduler's Sampler (the
    // old path: for comparisons and profiles).
    const char* host = std::getenv("ADAKV_HOST_SAMPLING");
    device_sampling_ = host == nullptr || host[0] == '\0' || std::string(host) == "0";
  }

  const ModelConfig& config() const override { return model_->config(); }
  const std::string& model_dir() const override { return model_dir_; }
  int64_t context_length() const override { return model_->context_length(); }
  int64_t kv_bytes_per_page() const override { return bytes_per_page(model_->kv_layout()); }
  const KvCacheManager& kv() const override { return manager_; }

  // K and V in bf16 plus the int32 token position and the fp32 metric (H2O, KV-Compress) of each slot.
  static int64_t bytes_per_page(const KvLayout& l) {
    return static_cast<int64_t>(l.page_size) * (int64_t{l.head_dim} * 2 * 2 + 4 + 4);
  }

  Expected<SeqId> add_sequence(const CompressConfig& compress) override {
    ADAKV_RETURN_IF_ERROR(cuda::compression_supported(compress));
    const SeqId seq = manager_.add_sequence();
    if (seq >= max_seqs_) {
      manager_.release(seq);
      return resource_exhausted("cuda runner: more than " + std::to_string(max_seqs_) +
                                " sequences at once (the device step was sized for max_running " +
                                std::to_string(max_seqs_) + ")");
    }
    Status s = model_->set_compression(seq, compress);
    if (!s.is_ok()) {
      manager_.release(seq);
      model_->on_release(seq);
      return s;
    }
    configs_[static_cast<size_t>(seq)] = compress;
    decode_steps_[static_cast<size_t>(seq)] = 0;
    return seq;
  }

  void release_sequence(SeqId seq) override {
    ADAKV_CHECK(manager_.has_sequence(seq), "release of an unknown sequence");
    manager_.release(seq);
    model_->on_release(seq);
    decode_steps_[static_cast<size_t>(seq)] = 0;
  }

  bool samples_on_device() const override { return device_sampling_; }

  void step(std::span<const StepItem> items, StepResult* out) override {
    const auto t_begin = std::chrono::steady_clock::now();
    const int64_t vocab = model_->config().vocab_size;
    out->status.assign(items.size(), Status::ok());
    out->logits_row.assign(items.size(), -1);
    out->sampled.assign(items.size(), -1);
    // Items sampled on the device return their token only; the others (a request that needs the
    // whole distribution, or ADAKV_HOST_SAMPLING=1) their fp32 logits row.
    int32_t rows = 0;
    for (size_t i = 0; i < items.size(); ++i)
      if (items[i].need_logits && !device_sampled(items[i])) out->logits_row[i] = rows++;
    out->logits.resize(static_cast<size_t>(rows) * static_cast<size_t>(vocab));

    // Items the device step would refuse fail alone; the others run together.
    steps_.clear();
    index_.clear();
    sampling_.clear();
    sampling_.reserve(items.size());  // steps_ point into it
    bool want_logits = false;
    for (size_t i = 0; i < items.size(); ++i) {
      const StepItem& it = items[i];
      Status s = check_item(it);
      if (!s.is_ok()) {
        out->status[i] = s;
        continue;
      }
      cuda::SeqStep st;
      st.seq = it.seq;
      st.tokens = it.tokens;
      st.compress = it.phase == StepPhase::kPrefillLast;
      st.prefill_part = it.phase == StepPhase::kPrefillPart;
      if (device_sampled(it)) {
        cuda::StepSampling ds;
        ds.temperature = it.sampling->temperature;
        ds.top_k = it.sampling->top_k;
        ds.top_p = it.sampling->top_p;
        ds.u = it.sampling->u;
        sampling_.push_back(ds);
        st.sampling = &sampling_.back();
      } else {
        want_logits = want_logits || it.need_logits;
      }
      steps_.push_back(st);
      index_.push_back(i);
    }
    if (steps_.empty()) return;
    const Status s = model_->step(steps_, manager_, want_logits, &result_);
    const cuda::CudaModel::StepTiming& mt = model_->last_step_timing();
    out->timings.prep_ms = mt.prep_ms;
    out->timings.mirror_ms = mt.mirror_ms;
    out->timings.plan_ms = mt.plan_ms;
    out->timings.enqueue_ms = mt.enqueue_ms;
    out->timings.wait_ms = mt.plan_ahead_ms + mt.wait_ms;  // the next step's plans run while the device works
    out->timings.results_ms = mt.results_ms;
    out->timings.compress_ms = mt.compress_ms;
    out->timings.device_ms = mt.device_ms;
    out->timings.download_ms = mt.download_ms;
    out->timings.logit_bytes = mt.logit_bytes;
    if (!s.is_ok()) {
      for (size_t i : index_) out->status[i] = s;
      return;
    }
    const auto t_copy = std::chrono::steady_clock::now();
    // result_.logits holds one row per step in steps_ order when want_logits (all_logits is off).
    for (size_t k = 0; k < index_.size(); ++k) {
      const size_t i = index_[k];
      const StepItem& it = items[i];
      if (steps_[k].sampling != nullptr) {
        out->sampled[i] = result_.sampled[k];
      } else if (it.need_logits) {
        std::copy_n(result_.logits.begin() + static_cast<int64_t>(k) * vocab, vocab,
                    out->logits.begin() + static_cast<int64_t>(out->logits_row[i]) * vocab);
      }
    }
    const auto t_compress = std::chrono::steady_clock::now();
    for (size_t k = 0; k < index_.size(); ++k) {
      const size_t i = index_[k];
      const StepItem& it = items[i];
      // Continual policies (streamingllm, h2o, kvcompress) compress every `interval` decode steps.
      const CompressConfig& c = configs_[static_cast<size_t>(it.seq)];
      if (it.phase == StepPhase::kDecode && policy_is_continual(c.policy) &&
          ++decode_steps_[static_cast<size_t>(it.seq)] % c.interval == 0) {
        const Status cs = model_->compress_now(it.seq, manager_);
        if (!cs.is_ok()) out->status[i] = cs;
      }
    }
    const auto t_end = std::chrono::steady_clock::now();
    using ms = std::chrono::duration<double, std::milli>;
    out->timings.results_ms += ms(t_compress - t_copy).count();
    out->timings.compress_ms += ms(t_end - t_compress).count();
    // What step() spent outside the model's step (checks, the loop above) counts as preparation.
    out->timings.prep_ms += ms(t_end - t_begin).count() - ms(t_end - t_copy).count() -
                            (mt.prep_ms + mt.mirror_ms + mt.plan_ms + mt.enqueue_ms + mt.plan_ahead_ms + mt.wait_ms + mt.results_ms +
                             mt.compress_ms);
  }

  int64_t compress_now(SeqId seq) override {
    if (!policy_is_continual(configs_[static_cast<size_t>(seq)].policy)) return 0;
    int64_t freed = 0;
    const Status s = model_->compress_now(seq, manager_, &freed);
    if (!s.is_ok()) return 0;  // the next step reports the device's state
    return freed;
  }

 private:
  bool device_sampled(const StepItem& it) const { return device_sampling_ && it.need_logits && it.sampling != nullptr; }

  Status check_item(const StepItem& it) const {
    if (it.seq < 0 || it.seq >= max_seqs_ || !manager_.has_sequence(it.seq))
      return invalid_argument("cuda runner: unknown sequence " + std::to_string(it.seq));
    if (it.tokens.empty()) return invalid_argument("cuda runner: an item without tokens");
    const int64_t vocab = model_->config().vocab_size;
    for (int32_t id : it.tokens)
      if (id < 0 || id >= vocab)
        return invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary of " +
                                std::to_string(vocab));
    const int64_t end = manager_.logical_length(it.seq) + static_cast<int64_t>(it.tokens.size());
    if (end > model_->context_length())
      return out_of_range("a sequence of " + std::to_string(end) + " tokens exceeds the context of " +
                          std::to_string(model_->context_length()));
    return Status::ok();
  }

  std::unique_ptr<cuda::CudaModel> model_;
  std::string model_dir_;
  int32_t max_seqs_;
  KvCacheManager manager_;
  std::vector<CompressConfig> configs_;   // [max_seqs] each live sequence's policy
  std::vector<int64_t> decode_steps_;     // [max_seqs] decode steps since the prompt (continual)
  std::vector<cuda::SeqStep> steps_;      // scratch: the device step
  std::vector<size_t> index_;             // [steps] item of each device step
  std::vector<cuda::StepSampling> sampling_;  // scratch: device sampling of the step's items
  bool device_sampling_ = true;
  cuda::StepResult result_;
};

}  // namespace

Expected<std::unique_ptr<ModelRunner>> create_cuda_model_runner(const std::string& model_dir,
                                                                const CudaRunnerOptions& options) {
  if (options.page_size != 16)
    return invalid_argument("page size " + std::to_string(options.page_size) +
                            " is not supported on cuda: the device pool's pages hold 16 tokens");
  if (options.kv_pages < 0) return invalid_argument("kv pages must be >= 0 (0: from the KV memory limit)");
  if (options.kv_memory_bytes < 0) return invalid_argument("KV memory must be >= 0 bytes");
  if (!(options.gpu_memory_fraction > 0.0 && options.gpu_memory_fraction <= 1.0))
    return invalid_argument("gpu memory fraction " + std::to_string(options.gpu_memory_fraction) +
                            " is out of range: allowed (0, 1]");
  if (options.max_seqs < 1) return invalid_argument("cuda runner: max_seqs must be >= 1");
  ADAKV_RETURN_IF_ERROR(cuda::cuda_device_available());

  ModelConfig cfg;
  std::string source = model_dir;
  if (!options.random_config.empty()) {
    ADAKV_ASSIGN_OR_RETURN(std::string text, read_text_file(options.random_config));
    ADAKV_ASSIGN_OR_RETURN(cfg, parse_model_config(text, options.random_config));
    source = options.random_config + " (random weights)";
  } else {
    ADAKV_ASSIGN_OR_RETURN(cfg, load_model_config(model_dir));
  }
  cuda::CudaModelOptions mo;
  mo.max_seqs = options.max_seqs;
  mo.max_step_tokens = options.max_step_tokens;
  mo.max_logit_rows = options.max_seqs;  // one row per item; items are distinct live sequences
  mo.gpu_memory_fraction = options.gpu_memory_fraction;
  mo.max_window = std::max(options.max_window, 1);
  KvLayout layout;
  layout.num_layers = static_cast<int32_t>(cfg.num_layers);
  layout.num_kv_heads = static_cast<int32_t>(cfg.num_kv_heads);
  layout.head_dim = static_cast<int32_t>(cfg.head_dim);
  layout.page_size = options.page_size;
  const int64_t page_bytes = CudaModelRunner::bytes_per_page(layout);
  if (options.kv_pages > 0) {
    mo.num_pages = options.kv_pages;
  } else if (options.kv_memory_bytes > 0) {
    mo.num_pages = options.kv_memory_bytes / page_bytes;
    if (mo.num_pages == 0)
      return invalid_argument("KV memory of " + std::to_string(options.kv_memory_bytes) +
                              " bytes is less than one page (" + std::to_string(page_bytes) +
                              " bytes: 16 tokens x head_dim " + std::to_string(layout.head_dim) +
                              " x K and V x bf16 + positions)");
  }
  if (mo.num_pages > (int64_t{1} << 31) / layout.page_size)
    return invalid_argument("a KV pool of " + std::to_string(mo.num_pages) + " pages is too large for int32 entry indices");
  std::unique_ptr<cuda::CudaModel> model;
  if (!options.random_config.empty()) {
    ADAKV_ASSIGN_OR_RETURN(model, cuda::CudaModel::random(cfg, options.seed, mo));
  } else {
    ADAKV_ASSIGN_OR_RETURN(model, cuda::CudaModel::load(model_dir, mo));
  }
  if (model->num_pages() > (int64_t{1} << 31) / layout.page_size)
    return invalid_argument("a KV pool of " + std::to_string(model->num_pages()) +
                            " pages is too large for int32 entry indices: lower --gpu-memory-fraction");
  return std::unique_ptr<ModelRunner>(new CudaModelRunner(std::move(model), source, options.max_seqs));
}

}  // namespace adakv
