#include "engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "engine/compression_observer.h"

namespace adakv {

int64_t kv_pages_for_tokens(const KvLayout& layout, int64_t tokens) {
  const int64_t rows = static_cast<int64_t>(layout.num_layers) * layout.num_kv_heads;
  return rows * ((tokens + layout.page_size - 1) / layout.page_size);
}

namespace {

double seconds_since(EngineClock::time_point t) {
  return std::chrono::duration<double>(EngineClock::now() - t).count();
}

bool continual(const EngineRequest& r) { return policy_is_continual(r.params.compress.policy); }

// A running request whose next item is one token: a decode, or (continual policies) a re-fed
// generated token after a preemption, which must go one step at a time so that the policy sees
// exactly the decode steps it saw the first time.
bool decoding(const EngineRequest& r) {
  const int64_t remaining = static_cast<int64_t>(r.tokens.size()) - r.fed;
  return r.fed >= r.prompt_length && (remaining == 1 || continual(r));
}

using ProfClock = std::chrono::steady_clock;
double ms_between(ProfClock::time_point a, ProfClock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Upper edges (ms) of the step-time histogram's buckets; the last bucket is open.
constexpr double kBucketEdges[StepProfiler::kBuckets - 1] = {5, 10, 15, 20, 30, 50, 75, 100, 200};

}  // namespace

bool StepProfiler::enabled_by_env() {
  const char* v = std::getenv("ADAKV_PROFILE");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

void StepProfiler::add(Kind kind, int64_t items, int64_t tokens, double sched_ms, double runner_ms,
                       double sample_ms, double post_ms, const StepTimings& t) {
  Acc& a = acc_[kind];
  ++a.steps;
  a.items += items;
  a.tokens += tokens;
  a.sched += sched_ms;
  a.runner += runner_ms;
  a.sample += sample_ms;
  a.post += post_ms;
  const double wall = sched_ms + runner_ms + post_ms;
  a.wall += wall;
  a.t.prep_ms += t.prep_ms;
  a.t.mirror_ms += t.mirror_ms;
  a.t.plan_ms += t.plan_ms;
  a.t.enqueue_ms += t.enqueue_ms;
  a.t.wait_ms += t.wait_ms;
  a.t.results_ms += t.results_ms;
  a.t.compress_ms += t.compress_ms;
  a.t.device_ms += t.device_ms;
  a.t.download_ms += t.download_ms;
  a.t.logit_bytes += t.logit_bytes;
  int bucket = 0;
  while (bucket < kBuckets - 1 && wall > kBucketEdges[bucket]) ++bucket;
  ++a.hist[bucket];
}

bool StepProfiler::empty() const {
  for (const Acc& a : acc_)
    if (a.steps > 0) return false;
  return true;
}

std::string StepProfiler::report() const {
  static const char* kNames[kKinds] = {"decode-only", "mixed", "prefill-only"};
  std::string out = "== step profile (ADAKV_PROFILE): ms per step, mean over the steps of each kind\n";
  char line[512];
  std::snprintf(line, sizeof line,
                "%-12s %6s %6s %7s | %7s %7s | %6s %6s %6s %6s %7s %6s %6s | %7s %7s | %6s %6s %6s %8s\n", "kind",
                "steps", "items", "tokens", "wall", "total_s", "sched", "prep", "mirror", "plan", "enqueue", "wait",
                "result", "device", "d2h", "compr", "sample", "post", "logit_MB");
  out += line;
  for (int k = 0; k < kKinds; ++k) {
    const Acc& a = acc_[k];
    if (a.steps == 0) continue;
    const double n = static_cast<double>(a.steps);
    std::snprintf(line, sizeof line,
                  "%-12s %6lld %6.1f %7.1f | %7.2f %7.2f | %6.2f %6.2f %6.2f %6.2f %7.2f %6.2f %6.2f | %7.2f %7.2f | "
                  "%6.2f %6.2f %6.2f %8.2f\n",
                  kNames[k], static_cast<long long>(a.steps), a.items / n, a.tokens / n, a.wall / n, a.wall / 1e3,
                  a.sched / n, a.t.prep_ms / n, a.t.mirror_ms / n, a.t.plan_ms / n, a.t.enqueue_ms / n,
                  a.t.wait_ms / n, a.t.results_ms / n, a.t.device_ms / n, a.t.download_ms / n, a.t.compress_ms / n,
                  a.sample / n, (a.post - a.sample) / n, static_cast<double>(a.t.logit_bytes) / n / 1e6);
    out += line;
  }
  out += "step wall histogram (ms):";
  for (int b = 0; b < kBuckets; ++b) {
    std::snprintf(line, sizeof line, b < kBuckets - 1 ? " <=%g" : " >%g", kBucketEdges[b < kBuckets - 1 ? b : b - 1]);
    out += line;
  }
  out += "\n";
  for (int k = 0; k < kKinds; ++k) {
    const Acc& a = acc_[k];
    if (a.steps == 0) continue;
    std::snprintf(line, sizeof line, "  %-12s", kNames[k]);
    out += line;
    for (int b = 0; b < kBuckets; ++b) {
      std::snprintf(line, sizeof line, " %lld", static_cast<long long>(a.hist[b]));
      out += line;
    }
    out += "\n";
  }
  out +=
      "(sched: scheduler host time before the runner; prep..result: the runner's host time (wait: blocked on the "
      "device); device: forward + device sampling (events); d2h: copies back after it; compr: host side of "
      "compression; sample: host Sampler; post: events and bookkeeping)\n";
  return out;
}

Scheduler::Scheduler(ModelRunner& runner, const SchedulerOptions& options) : runner_(runner), options_(options) {
  ADAKV_CHECK(options.max_running >= 1 && options.prefill_chunk >= 1 &&
                  options.max_step_tokens >= options.max_running + options.prefill_chunk,
              "scheduler options must be validated (engine_impl.cc)");
  counters_.kv_pages_total = runner.kv().num_pages();
  profile_ = StepProfiler::enabled_by_env();
}

Scheduler::~Scheduler() {
  cancel_all();
  if (profile_ && !profiler_.empty()) {
    const std::string r = profiler_.report();
    std::fprintf(stderr, "%s", r.c_str());
    std::fflush(stderr);
  }
}

void Scheduler::add(std::unique_ptr<EngineRequest> request) {
  ADAKV_CHECK(request->prompt_length > 0 && static_cast<int64_t>(request->tokens.size()) == request->prompt_length,
              "a new request holds exactly its prompt");
  waiting_.push_back(std::move(request));
  counters_.requests_waiting = static_cast<int64_t>(waiting_.size());
}

void Scheduler::cancel(RequestId id) {
  for (auto& r : running_)
    if (r->id == id) return finish(*r, FinishReason::kCancelled, Status::ok(), -1);
  for (auto& r : waiting_)
    if (r->id == id) return finish(*r, FinishReason::kCancelled, Status::ok(), -1);
}

void Scheduler::cancel_all() {
  while (!running_.empty()) finish(*running_.back(), FinishReason::kCancelled, Status::ok(), -1);
  while (!waiting_.empty()) finish(*waiting_.back(), FinishReason::kCancelled, Status::ok(), -1);
}

RequestUsage Scheduler::usage(const EngineRequest& r) const {
  RequestUsage u;
  u.prompt_tokens = r.prompt_length;
  u.generated_tokens = r.generated;
  if (r.seq >= 0) {
    const KvCacheStats s = kv_cache_stats(runner_.kv(), r.seq);
    u.kv_entries = s.entries;
    u.kv_full_entries = s.full_entries;
  }
  u.preemptions = r.preemptions;
  u.queue_seconds = r.queue_seconds;
  u.first_token_seconds = r.first_token_seconds;
  return u;
}

void Scheduler::emit(EngineRequest& r, int32_t token, bool finished, FinishReason reason, Status error) {
  TokenEvent e;
  e.token = token;
  e.finished = finished;
  e.reason = reason;
  e.error = std::move(error);
  e.usage = usage(r);
  if (!r.on_event) return;
  try {
    r.on_event(e);
  } catch (...) {
    // A throwing callback must not take the scheduler thread (and every other request) down.
  }
}

void Scheduler::release(EngineRequest& r) {
  if (r.seq < 0) return;
  runner_.release_sequence(r.seq);
  r.seq = -1;
  r.fed = 0;
}

void Scheduler::remove_running(EngineRequest* r) {
  auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == r; });
  ADAKV_CHECK(it != running_.end(), "remove_running: not running");
  running_.erase(it);
}

void Scheduler::finish(EngineRequest& r, FinishReason reason, Status error, int32_t token) {
  // The final event reports the cache as it was at the end; then the pages go back.
  TokenEvent e;
  e.token = token;
  e.finished = true;
  e.reason = reason;
  e.error = std::move(error);
  e.usage = usage(r);
  release(r);
  std::unique_ptr<EngineRequest> owned;
  auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == &r; });
  if (it != running_.end()) {
    owned = std::move(*it);
    running_.erase(it);
  } else {
    auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& p) { return p.get() == &r; });
    ADAKV_CHECK(w != waiting_.end(), "finish: request neither running nor waiting");
    owned = std::move(*w);
    waiting_.erase(w);
  }
  ++counters_.requests_finished;
  counters_.requests_running = static_cast<int64_t>(running_.size());
  counters_.requests_waiting = static_cast<int64_t>(waiting_.size());
  counters_.kv_pages_used = runner_.kv().used_pages();
  if (owned->on_event) {
    try {
      owned->on_event(e);
    } catch (...) {
    }
  }
}

bool Scheduler::next_item(EngineRequest& r, int64_t budget, StepItem* item) const {
  const int64_t total = static_cast<int64_t>(r.tokens.size());
  const int64_t chunk = options_.prefill_chunk;
  int64_t n = 0;
  if (r.fed < r.prompt_length) {
    // Chunk boundaries at multiples of prefill_chunk, whatever the step's budget: a recompute
    // after a preemption repeats the same chunks, so it computes (and compresses) the same cache.
    const int64_t end = std::min(r.prompt_length, (r.fed / chunk + 1) * chunk);
    n = end - r.fed;
    item->phase = end == r.prompt_length ? StepPhase::kPrefillLast : StepPhase::kPrefillPart;
  } else if (decoding(r)) {
    n = 1;
    item->phase = StepPhase::kDecode;
  } else {
    n = std::min(total - 1 - r.fed, chunk);  // re-fed generated tokens; the pending one decodes
    item->phase = StepPhase::kAppend;
  }
  if (n > budget || n <= 0) return false;
  item->seq = r.seq;
  item->tokens = std::span<const int32_t>(r.tokens.data() + r.fed, static_cast<size_t>(n));
  item->need_logits = r.fed + n == total;
  return true;
}

Admission Scheduler::reserve(const std::vector<Planned>& plan, int64_t* pages_needed) const {
  std::vector<KvGrowth> growths;
  growths.reserve(plan.size());
  for (const Planned& p : plan) growths.push_back({p.item.seq, static_cast<int32_t>(p.item.tokens.size())});
  KvReservation r;
  const Admission a = runner_.kv().reserve(growths, &r);
  *pages_needed = r.pages_needed;
  return a;
}

EngineRequest* Scheduler::preempt_youngest() {
  ADAKV_CHECK(!running_.empty(), "preempt with nothing running");
  std::unique_ptr<EngineRequest> victim = std::move(running_.back());
  running_.pop_back();
  release(*victim);  // recompute: the cache is rebuilt from the tokens when it is admitted again
  ++victim->preemptions;
  ++counters_.preemptions_total;
  EngineRequest* raw = victim.get();
  // Older requests first: a preempted request goes before every younger waiting one.
  auto pos = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& w) { return w->id > raw->id; });
  waiting_.insert(pos, std::move(victim));
  return raw;
}

bool Scheduler::admit_one(int64_t pages_committed, int64_t* budget, std::vector<Planned>* plan) {
  EngineRequest& r = *waiting_.front();
  const KvCacheManager& kv = runner_.kv();
  // The prompt's rows stay complete until its last chunk: its whole uncompressed prompt must
  // fit next to what the running sequences are still owed (pages_committed).
  const int64_t need = kv_pages_for_tokens(kv.layout(), r.prompt_length);
  if (need > kv.free_pages() - pages_committed) return false;
  Expected<SeqId> seq = runner_.add_sequence(r.params.compress);
  if (!seq.has_value()) {
    finish(r, FinishReason::kError, seq.status(), -1);
    return true;
  }
  std::unique_ptr<EngineRequest> owned = std::move(waiting_.front());
  waiting_.pop_front();
  owned->seq = seq.value();
  owned->fed = 0;
  if (!owned->scheduled) {
    owned->scheduled = true;
    owned->queue_seconds = seconds_since(owned->submitted);
  }
  EngineRequest* raw = owned.get();
  auto pos = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p->id > raw->id; });
  running_.insert(pos, std::move(owned));
  StepItem item;
  if (next_item(*raw, *budget, &item)) {
    plan->push_back({raw, item});
    *budget -= static_cast<int64_t>(item.tokens.size());
  }
  return true;
}

void Scheduler::step() {
  if (idle()) return;
  const ProfClock::time_point t_begin = ProfClock::now();
  ++counters_.steps;
  const KvCacheManager& kv = runner_.kv();

  // 1. The running sequences' work: every decode first, then chunks within the budget.
  std::vector<Planned> plan;
  int64_t budget = options_.max_step_tokens;
  for (int pass = 0; pass < 2; ++pass) {
    for (auto& r : running_) {
      if (decoding(*r) != (pass == 0)) continue;
      StepItem item;
      if (!next_item(*r, budget, &item)) continue;
      plan.push_back({r.get(), item});
      budget -= static_cast<int64_t>(item.tokens.size());
    }
  }

  // 2. Pages for it: compress continual policies first, then preempt the youngest.
  bool compressed = false;
  bool preempted = false;
  int64_t pages_needed = 0;
  for (;;) {
    const Admission a = reserve(plan, &pages_needed);
    if (a == Admission::kOk) break;
    if (!compressed) {
      compressed = true;
      std::vector<EngineRequest*> order;
      for (auto& r : running_)
        if (continual(*r) && r->fed >= r->prompt_length) order.push_back(r.get());  // never mid-prefill
      std::stable_sort(order.begin(), order.end(), [&](EngineRequest* a, EngineRequest* b) {
        return kv.sequence_pages(a->seq) > kv.sequence_pages(b->seq);
      });
      bool fits = false;
      for (EngineRequest* r : order) {
        ++counters_.compress_now_calls;
        counters_.compress_now_pages += runner_.compress_now(r->seq);
        if (reserve(plan, &pages_needed) == Admission::kOk) {
          fits = true;
          break;
        }
      }
      if (fits) break;
      continue;
    }
    if (running_.size() == 1) {
      // Alone in the pool and still too big: no preemption can help.
      EngineRequest& r = *running_.front();
      const std::string msg = "KV cache exhausted: request " + std::to_string(r.id) + " holds " +
                              std::to_string(kv.logical_length(r.seq)) + " tokens in " +
                              std::to_string(kv.sequence_pages(r.seq)) + " pages and needs " +
                              std::to_string(pages_needed) + " more; the pool has " +
                              std::to_string(kv.num_pages()) + " pages in all (policy " +
                              kv_policy_name(r.params.compress.policy) + ")";
      finish(r, FinishReason::kError, resource_exhausted(msg), -1);
      plan.clear();
      break;
    }
    EngineRequest* victim = preempt_youngest();
    preempted = true;
    plan.erase(std::remove_if(plan.begin(), plan.end(), [&](const Planned& p) { return p.request == victim; }),
               plan.end());
  }

  // 3. Admission, oldest first, none skipped. What running sequences are still owed counts:
  // the rest of their prompts (rows complete until the last chunk) and re-fed tokens.
  // Not in a step that had to preempt: the pages just freed are owed to the growth that forced
  // it, and a request admitted into them would only be preempted again.
  if (!preempted && !waiting_.empty() && static_cast<int32_t>(running_.size()) < options_.max_running) {
    std::vector<KvGrowth> owed;
    for (auto& r : running_) {
      const int64_t remaining = static_cast<int64_t>(r->tokens.size()) - r->fed;
      owed.push_back({r->seq, static_cast<int32_t>(remaining)});
    }
    KvReservation res;
    (void)kv.reserve(owed, &res);
    int64_t committed = res.pages_needed;
    while (!waiting_.empty() && static_cast<int32_t>(running_.size()) < options_.max_running) {
      const int64_t prompt = waiting_.front()->prompt_length;
      if (!admit_one(committed, &budget, &plan)) break;
      committed += kv_pages_for_tokens(kv.layout(), prompt);
    }
    const Admission a = reserve(plan, &pages_needed);
    ADAKV_CHECK(a == Admission::kOk, "admission admitted a step that does not fit");
  }

  counters_.peak_kv_pages_used = std::max(counters_.peak_kv_pages_used, kv.used_pages() + pages_needed);
  counters_.peak_running = std::max(counters_.peak_running, static_cast<int64_t>(running_.size()));
  counters_.requests_running = static_cast<int64_t>(running_.size());
  counters_.requests_waiting = static_cast<int64_t>(waiting_.size());
  if (plan.empty()) {
    counters_.kv_pages_used = kv.used_pages();
    return;
  }

  // 4. Run it, then sample, stop and report. A runner that samples on the device gets each
  // request's sampling parameters and its Sampler's uniform draw (drawn here, for the items that
  // run, exactly as Sampler::sample would), and returns only the token.
  const bool device_sampling = runner_.samples_on_device();
  std::vector<StepItem> items;
  items.reserve(plan.size());
  sampling_.clear();
  sampling_.reserve(plan.size());  // no reallocation: items point into it
  int64_t n_tokens = 0;
  bool any_decode = false, any_chunk = false;
  for (const Planned& p : plan) {
    StepItem it = p.item;
    if (device_sampling && it.need_logits) {
      const SamplingParams& sp = p.request->sampler.params();
      ItemSampling s;
      s.temperature = sp.temperature;
      s.top_k = sp.top_k;
      s.top_p = sp.top_p;
      s.u = sp.temperature > 0.0f ? p.request->sampler.next_uniform() : 0.0;
      sampling_.push_back(s);
      it.sampling = &sampling_.back();
    }
    n_tokens += static_cast<int64_t>(it.tokens.size());
    (it.phase == StepPhase::kDecode ? any_decode : any_chunk) = true;
    items.push_back(it);
  }
  const ProfClock::time_point t_run = ProfClock::now();
  result_.sampled.clear();
  result_.timings = StepTimings{};
  runner_.step(items, &result_);
  const ProfClock::time_point t_ran = ProfClock::now();
  double sample_ms = 0.0;
  const int64_t vocab = runner_.config().vocab_size;
  for (size_t i = 0; i < plan.size(); ++i) {
    EngineRequest& r = *plan[i].request;
    const StepItem& item = plan[i].item;
    if (!result_.status[i].is_ok()) {
      finish(r, FinishReason::kError, result_.status[i], -1);
      continue;
    }
    r.fed += static_cast<int64_t>(item.tokens.size());
    if (item.phase == StepPhase::kPrefillLast && !r.prefilled_once) {
      r.prefilled_once = true;
      const KvCacheStats s = kv_cache_stats(kv, r.seq);
      counters_.kv_entries_kept_total += s.entries;
      counters_.kv_entries_evicted_total += s.full_entries - s.entries;
    }
    int32_t token = -1;
    if (i < result_.sampled.size() && result_.sampled[i] >= 0) {
      token = result_.sampled[i];
    } else {
      if (result_.logits_row[i] < 0) continue;
      const ProfClock::time_point t_s = profile_ ? ProfClock::now() : ProfClock::time_point{};
      const std::span<const float> logits(result_.logits.data() + static_cast<int64_t>(result_.logits_row[i]) * vocab,
                                          static_cast<size_t>(vocab));
      token = r.sampler.sample(logits);
      if (profile_) sample_ms += ms_between(t_s, ProfClock::now());
    }
    if (std::find(r.stop_ids.begin(), r.stop_ids.end(), token) != r.stop_ids.end()) {
      if (r.generated == 0) r.first_token_seconds = seconds_since(r.submitted);
      finish(r, FinishReason::kStop, Status::ok(), -1);
      continue;
    }
    r.tokens.push_back(token);
    ++r.generated;
    ++counters_.generated_tokens_total;
    if (r.generated == 1) r.first_token_seconds = seconds_since(r.submitted);
    if (r.generated >= r.params.max_new_tokens) {
      finish(r, FinishReason::kLength, Status::ok(), token);
    } else {
      emit(r, token, false, FinishReason::kNone, Status::ok());
    }
  }
  counters_.requests_running = static_cast<int64_t>(running_.size());
  counters_.requests_waiting = static_cast<int64_t>(waiting_.size());
  counters_.kv_pages_used = kv.used_pages();
  if (profile_) {
    const StepProfiler::Kind kind = !any_chunk ? StepProfiler::kDecodeOnly
                                    : any_decode ? StepProfiler::kMixed
                                                 : StepProfiler::kPrefillOnly;
    profiler_.add(kind, static_cast<int64_t>(items.size()), n_tokens, ms_between(t_begin, t_run),
                  ms_between(t_run, t_ran), sample_ms, ms_between(t_ran, ProfClock::now()), result_.timings);
  }
}

}  // namespace adakv
