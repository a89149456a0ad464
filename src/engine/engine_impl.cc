// Engine::create and the engine's threads: callers submit/cancel through a RequestQueue; one
// scheduler thread drains it between steps and runs the Scheduler. Stats are a snapshot the
// scheduler thread publishes after each step.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

#include "adakv/engine.h"
#include "core/parallel.h"
#include "engine/generator.h"
#include "engine/model_runner.h"
#include "engine/model_runner_factory.h"
#include "engine/request_queue.h"
#include "engine/scheduler.h"
#include "io/tokenizer.h"

namespace adakv {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "";
}

Status validate_engine_options(const EngineOptions& o) {
  auto range = [](const char* name, int64_t v, int64_t lo, int64_t hi) -> Status {
    if (v >= lo && v <= hi) return Status::ok();
    return invalid_argument(std::string(name) + " " + std::to_string(v) + " is out of range: allowed [" +
                            std::to_string(lo) + ", " + std::to_string(hi) + "]");
  };
  if (o.model_dir.empty()) return invalid_argument("no model directory given");
  ADAKV_RETURN_IF_ERROR(validate_device_options(o));
  ADAKV_RETURN_IF_ERROR(range("page_size", o.page_size, 1, 4096));
  ADAKV_RETURN_IF_ERROR(range("kv_pages", o.kv_pages, 0, int64_t{1} << 40));
  ADAKV_RETURN_IF_ERROR(range("kv_memory_bytes", o.kv_memory_bytes, 0, int64_t{1} << 50));
  ADAKV_RETURN_IF_ERROR(range("max_running", o.max_running, 1, 1 << 20));
  ADAKV_RETURN_IF_ERROR(range("prefill_chunk", o.prefill_chunk, 1, 1 << 24));
  ADAKV_RETURN_IF_ERROR(range("threads", o.threads, 0, 4096));
  if (static_cast<int64_t>(o.max_step_tokens) < static_cast<int64_t>(o.max_running) + o.prefill_chunk) {
    return invalid_argument("max_step_tokens " + std::to_string(o.max_step_tokens) + " is less than max_running " +
                            std::to_string(o.max_running) + " + prefill_chunk " + std::to_string(o.prefill_chunk) +
                            ": every step must have room for all decodes and one prompt chunk");
  }
  Status c = validate_compress_config(o.default_compress);
  if (!c.is_ok()) return c.with_context("default compression");
  return Status::ok();
}

namespace {

class EngineImpl final : public Engine {
 public:
  EngineImpl(EngineOptions options, std::unique_ptr<ModelRunner> runner, std::shared_ptr<Tokenizer> tokenizer)
      : options_(std::move(options)), runner_(std::move(runner)), tokenizer_(std::move(tokenizer)) {
    SchedulerOptions so;
    so.max_running = options_.max_running;
    so.max_step_tokens = options_.max_step_tokens;
    so.prefill_chunk = options_.prefill_chunk;
    scheduler_ = std::make_unique<Scheduler>(*runner_, so);
    model_eos_ = runner_->config().eos_token_ids;
    for (int32_t id : tokenizer_->eos_ids())
      if (std::find(model_eos_.begin(), model_eos_.end(), id) == model_eos_.end()) model_eos_.push_back(id);
    stats_.kv_pages_total = runner_->kv().num_pages();
    thread_ = std::thread([this] { run(); });
  }
  ~EngineImpl() override { shutdown(/*drain=*/false); }

  const ModelConfig& config() const override { return runner_->config(); }
  const Tokenizer& tokenizer() const override { return *tokenizer_; }
  int64_t context_length() const override { return runner_->context_length(); }
  const EngineOptions& options() const override { return options_; }

  Expected<RequestId> submit(RequestParams params, TokenCallback on_event) override {
    ADAKV_RETURN_IF_ERROR(validate(params));
    std::lock_guard<std::mutex> lock(submit_mu_);  // ids in queue order; refused once stopping
    if (!accepting_) return Status(StatusCode::kUnimplemented, "the engine is shutting down: no new requests");
    const RequestId id = next_id_++;
    auto r = std::make_unique<EngineRequest>(id, std::move(params), std::move(on_event));
    if (!r->params.ignore_eos) r->stop_ids = r->params.stop_ids.empty() ? model_eos_ : r->params.stop_ids;
    r->tokens = r->params.prompt;
    r->prompt_length = static_cast<int64_t>(r->tokens.size());
    r->submitted = EngineClock::now();
    {
      std::lock_guard<std::mutex> s(stats_mu_);
      ++stats_.requests_total;
      stats_.prompt_tokens_total += r->prompt_length;
      ++stats_.requests_waiting;
    }
    queue_.push(std::move(r));
    return id;
  }

  void cancel(RequestId id) override { queue_.cancel(id); }

  EngineStats stats() const override {
    std::lock_guard<std::mutex> lock(stats_mu_);
    return stats_;
  }

  void shutdown(bool drain) override {
    {
      std::lock_guard<std::mutex> lock(submit_mu_);
      accepting_ = false;
    }
    queue_.stop(drain ? RequestQueue::Stop::kDrain : RequestQueue::Stop::kCancel);
    // From an event callback (the scheduler thread itself): the order is in, the thread stops
    // after this step; joining itself would deadlock.
    if (std::this_thread::get_id() == thread_.get_id()) return;
    std::lock_guard<std::mutex> once(shutdown_mu_);
    if (thread_.joinable()) thread_.join();
  }

 private:
  Status validate(const RequestParams& p) const {
    const int64_t n = static_cast<int64_t>(p.prompt.size());
    if (n == 0) return invalid_argument("the prompt is empty (no tokens)");
    const int64_t vocab = runner_->config().vocab_size;
    for (size_t i = 0; i < p.prompt.size(); ++i) {
      if (p.prompt[i] < 0 || p.prompt[i] >= vocab) {
        return invalid_argument("prompt token " + std::to_string(i) + " has id " + std::to_string(p.prompt[i]) +
                                ", outside the vocabulary of " + std::to_string(vocab));
      }
    }
    if (p.max_new_tokens < 1) {
      return invalid_argument("max_new_tokens must be >= 1, got " + std::to_string(p.max_new_tokens));
    }
    ADAKV_RETURN_IF_ERROR(check_fits_context(n, p.max_new_tokens, runner_->context_length()));
    ADAKV_RETURN_IF_ERROR(validate_sampling(p.sampling));
    ADAKV_RETURN_IF_ERROR(validate_compress_config(p.compress));
    // Layout and pool size never change after create, so this read needs no lock.
    const KvCacheManager& kv = runner_->kv();
    const int64_t need = kv_pages_for_tokens(kv.layout(), n);
    if (need > kv.num_pages()) {
      const KvLayout& l = kv.layout();
      return resource_exhausted(
          "prompt of " + std::to_string(n) + " tokens can never fit the KV cache: its prefill needs " +
          std::to_string(need) + " pages (" + std::to_string(l.num_layers) + " layers x " +
          std::to_string(l.num_kv_heads) + " kv heads x " + std::to_string((n + l.page_size - 1) / l.page_size) +
          " pages of " + std::to_string(l.page_size) + " tokens) and the pool holds " +
          std::to_string(kv.num_pages()) + " pages");
    }
    return Status::ok();
  }

  void run() {
    for (;;) {
      RequestQueue::Batch batch = queue_.take(/*wait=*/scheduler_->idle());
      // Submissions first: a cancel in the same batch may name a request submitted with it.
      for (auto& r : batch.submitted) scheduler_->add(std::move(r));
      for (RequestId id : batch.cancelled) scheduler_->cancel(id);
      if (batch.stop == RequestQueue::Stop::kCancel) scheduler_->cancel_all();
      if (batch.stop != RequestQueue::Stop::kNone && scheduler_->idle()) {
        publish();
        return;
      }
      scheduler_->step();
      publish();
    }
  }

  void publish() {
    const SchedulerCounters& c = scheduler_->counters();
    const auto now = EngineClock::now();
    // Generated tokens/s over the last few seconds (at least one sample apart).
    rate_.push_back({now, c.generated_tokens_total});
    while (rate_.size() > 2 && now - rate_[1].first > std::chrono::seconds(5)) rate_.pop_front();
    double rate = 0.0;
    const double span = std::chrono::duration<double>(now - rate_.front().first).count();
    if (span > 0.0) rate = static_cast<double>(c.generated_tokens_total - rate_.front().second) / span;
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.requests_finished = c.requests_finished;
    stats_.requests_running = c.requests_running;
    // Submitted but not yet handed to the scheduler count as waiting too.
    stats_.requests_waiting = stats_.requests_total - c.requests_finished - c.requests_running;
    stats_.generated_tokens_total = c.generated_tokens_total;
    stats_.preemptions_total = c.preemptions_total;
    stats_.kv_pages_total = c.kv_pages_total;
    stats_.kv_pages_used = c.kv_pages_used;
    stats_.kv_entries_kept_total = c.kv_entries_kept_total;
    stats_.kv_entries_evicted_total = c.kv_entries_evicted_total;
    stats_.tokens_per_second = rate;
    stats_.peak_running = c.peak_running;
    stats_.peak_kv_pages_used = c.peak_kv_pages_used;
  }

  const EngineOptions options_;
  std::unique_ptr<ModelRunner> runner_;
  std::shared_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Scheduler> scheduler_;  // scheduler thread only
  std::vector<int32_t> model_eos_;        // config + tokenizer end tokens

  RequestQueue queue_;
  std::mutex submit_mu_;
  bool accepting_ = true;
  RequestId next_id_ = 1;
  std::mutex shutdown_mu_;

  mutable std::mutex stats_mu_;
  EngineStats stats_;
  std::deque<std::pair<EngineClock::time_point, int64_t>> rate_;  // scheduler thread only

  std::thread thread_;  // last: starts after everything above exists
};

}  // namespace

Expected<std::unique_ptr<Engine>> Engine::create(const EngineOptions& options) {
  ADAKV_RETURN_IF_ERROR(validate_engine_options(options));
  if (options.threads > 0) {
    // The CPU backend's thread pool is process-wide and sized once, at first use.
    setenv("ADAKV_NUM_THREADS", std::to_string(options.threads).c_str(), /*overwrite=*/0);
    const int have = ThreadPool::global().num_threads();
    if (have != options.threads) {
      return invalid_argument("threads " + std::to_string(options.threads) + ": this process's CPU thread pool " +
                              "already runs " + std::to_string(have) + " threads (it is sized once per process)");
    }
  }
  ADAKV_ASSIGN_OR_RETURN(std::unique_ptr<ModelRunner> runner, create_model_runner(options));
  ADAKV_ASSIGN_OR_RETURN(std::shared_ptr<Tokenizer> tokenizer, Tokenizer::load(options.model_dir));
  return std::unique_ptr<Engine>(new EngineImpl(options, std::move(runner), std::move(tokenizer)));
}

}  // namespace adakv
