// The continuous-batching scheduler: single-threaded, driven one step at a time by the engine's
// thread (engine_impl.cc), or directly by tests. docs/scheduling.md describes it; in short, a
// step is
//   1. work of the running sequences: one token per decoding sequence, then prompt chunks (and,
//      after a preemption, the re-fed generated tokens) within the step's token budget;
//   2. pages for it: KvCacheManager::reserve over all growths; when Later, compress sequences
//      with continual policies (ModelRunner::compress_now), then preempt the youngest running
//      request (release its pages, requeue it at the front) until the step fits;
//   3. admission: waiting requests, oldest first, while the pages of their whole uncompressed
//      prompt fit next to what the running sequences still need (no skipping ahead);
//   4. ModelRunner::step, then sampling, stop checks and events.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "adakv/engine.h"
#include "engine/engine_request.h"
#include "engine/model_runner.h"

namespace adakv {

struct SchedulerOptions {
  int32_t max_running = 64;
  int32_t max_step_tokens = 2048;
  int32_t prefill_chunk = 512;
};

// Counters for EngineStats (the engine adds the submission-side ones and the rate).
struct SchedulerCounters {
  int64_t requests_finished = 0;
  int64_t requests_running = 0;
  int64_t requests_waiting = 0;
  int64_t generated_tokens_total = 0;
  int64_t preemptions_total = 0;
  int64_t kv_pages_total = 0;
  int64_t kv_pages_used = 0;
  int64_t kv_entries_kept_total = 0;
  int64_t kv_entries_evicted_total = 0;
  int64_t peak_running = 0;
  int64_t peak_kv_pages_used = 0;    // used + reserved at the start of a step (an upper bound)
  int64_t steps = 0;
  int64_t compress_now_calls = 0;    // compressions run to avoid a preemption
  int64_t compress_now_pages = 0;    // pages they freed
};

// Pages the full cache of a fresh sequence of `tokens` tokens needs in every row.
int64_t kv_pages_for_tokens(const KvLayout& layout, int64_t tokens);

// Per-step profile (ADAKV_PROFILE=1; printed to stderr when the scheduler is destroyed, i.e. at
// the end of `adakv bench serve`): host time in the scheduler, the runner's breakdown
// (StepTimings), sampling and events, per kind of step, and a step-time histogram.
class StepProfiler {
 public:
  enum Kind { kDecodeOnly = 0, kMixed, kPrefillOnly, kKinds };
  static constexpr int kBuckets = 10;
  static bool enabled_by_env();
  void add(Kind kind, int64_t items, int64_t tokens, double sched_ms, double runner_ms, double sample_ms,
           double post_ms, const StepTimings& t);
  std::string report() const;
  bool empty() const;

 private:
  struct Acc {
    int64_t steps = 0, items = 0, tokens = 0;
    double sched = 0, runner = 0, sample = 0, post = 0, wall = 0;
    StepTimings t;
    int64_t hist[kBuckets] = {};
  };
  Acc acc_[kKinds];
};

class Scheduler {
 public:
  Scheduler(ModelRunner& runner, const SchedulerOptions& options);
  ~Scheduler();  // cancels whatever is left
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a validated request (its stop_ids, tokens and prompt_length set) at the back.
  void add(std::unique_ptr<EngineRequest> request);
  // Ends a waiting or running request now: pages freed, final event kCancelled. Unknown ids
  // are ignored.
  void cancel(RequestId id);
  void cancel_all();
  bool idle() const { return running_.empty() && waiting_.empty(); }
  // One step (see the file comment). Does nothing when idle.
  void step();
  const SchedulerCounters& counters() const { return counters_; }

 private:
  struct Planned {
    EngineRequest* request;
    StepItem item;
  };
  // The next item of a running request within `budget` tokens; false when none fits.
  bool next_item(EngineRequest& r, int64_t budget, StepItem* item) const;
  // Pages needed by `growths` beyond the free pages, and the admission verdict.
  Admission reserve(const std::vector<Planned>& plan, int64_t* pages_needed) const;
  // Releases the youngest running request's pages and requeues it; returns it.
  EngineRequest* preempt_youngest();
  bool admit_one(int64_t step_pages, int64_t* budget, std::vector<Planned>* plan);
  void finish(EngineRequest& r, FinishReason reason, Status error, int32_t token);
  void emit(EngineRequest& r, int32_t token, bool finished, FinishReason reason, Status error);
  void release(EngineRequest& r);
  RequestUsage usage(const EngineRequest& r) const;
  void remove_running(EngineRequest* r);

  ModelRunner& runner_;
  SchedulerOptions options_;
  std::deque<std::unique_ptr<EngineRequest>> waiting_;   // oldest (or preempted) first
  std::vector<std::unique_ptr<EngineRequest>> running_;  // in request-id order
  SchedulerCounters counters_;
  StepResult result_;
  std::vector<int32_t> step_tokens_;  // scratch
  std::vector<ItemSampling> sampling_;  // scratch: one per item sampled by the runner
  bool profile_ = false;
  StepProfiler profiler_;
};

}  // namespace adakv
