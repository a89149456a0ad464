// The engine (continuous batching, include/adakv/engine.h) against single-sequence generate():
// many concurrent requests, each with its own compression policy, give the greedy tokens
// generate() gives them alone; chunked prefill; a pool so small that requests wait and are
// preempted; refusals; cancellation and shutdown. Scheduler-level tests drive the Scheduler
// step by step (no thread) to look at the pool between steps.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "adakv/engine.h"
#include "engine/generator.h"
#include "engine/model_runner.h"
#include "engine/scheduler.h"
#include "model/transformer.h"

namespace adakv {
namespace {

namespace fs = std::filesystem;
const std::string kQwen3 = (fs::path(ADAKV_FIXTURES_DIR) / "models" / "qwen3").string();
const std::string kTiny = std::string(ADAKV_SOURCE_DIR) + "/models/adakv-tiny-v1";

std::vector<int32_t> tokens_for(int64_t vocab, int64_t n, uint32_t seed) {
  std::vector<int32_t> t;
  uint32_t x = seed * 2654435761u + 12345u;
  for (int64_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    t.push_back(static_cast<int32_t>((x >> 8) % static_cast<uint32_t>(vocab)));
  }
  return t;
}

CompressConfig policy(KvPolicy p, int32_t budget, int32_t window) {
  CompressConfig c;
  c.policy = p;
  c.budget = budget;
  c.window = window;
  c.protected_window = window;
  c.interval = 4;
  c.sink = 2;
  EXPECT_TRUE(validate_compress_config(c).is_ok()) << kv_policy_name(p);
  return c;
}

// Everything one request reported.
struct Outcome {
  std::vector<int32_t> tokens;
  int events = 0;
  int finished_events = 0;
  FinishReason reason = FinishReason::kNone;
  Status error;
  RequestUsage usage;
};

// Collects events of many requests; wait() returns when every one has finished.
class Collector {
 public:
  TokenCallback callback(size_t index) {
    return [this, index](const TokenEvent& e) {
      std::unique_lock<std::mutex> lock(mu_);
      Outcome& o = out_[index];
      if (hold_ && o.events == 0 && index == 0) {
        // Holds the scheduler thread inside request 0's first event until release(): the test
        // acts while the engine provably is mid-generation.
        held_ = true;
        cv_.notify_all();
        cv_.wait(lock, [&] { return !hold_; });
      }
      ++o.events;
      if (e.token >= 0) o.tokens.push_back(e.token);
      o.usage = e.usage;
      if (e.finished) {
        ++o.finished_events;
        o.reason = e.reason;
        o.error = e.error;
        ++finished_;
        cv_.notify_all();
      }
    };
  }
  bool wait(size_t n, std::chrono::seconds timeout = std::chrono::seconds(300)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return finished_ >= n; });
  }
  // Makes request 0's first event wait for release().
  void hold() { hold_ = true; }
  bool wait_held() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(120), [&] { return held_; });
  }
  void release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      hold_ = false;
    }
    cv_.notify_all();
  }
  std::map<size_t, Outcome> outcomes() {
    std::lock_guard<std::mutex> lock(mu_);
    return out_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<size_t, Outcome> out_;
  size_t finished_ = 0;
  bool hold_ = false;
  bool held_ = false;
};

std::vector<int32_t> reference(const Transformer& model, const RequestParams& p, int32_t page_size) {
  GenerateOptions o;
  o.max_new_tokens = p.max_new_tokens;
  o.sampling = p.sampling;
  o.ignore_eos = p.ignore_eos;
  o.eos_ids = p.stop_ids;
  o.page_size = page_size;
  o.compress = &p.compress;
  Expected<GenerateResult> r = generate(model, p.prompt, o, nullptr);
  EXPECT_TRUE(r.has_value()) << r.status().message();
  return r.has_value() ? r->tokens : std::vector<int32_t>{};
}

// Stats are published after each step, final events are sent during it: wait for the snapshot
// that counts `finished` requests.
EngineStats settled_stats(const Engine& engine, int64_t finished) {
  for (int tries = 0; tries < 500 && engine.stats().requests_finished < finished; ++tries)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return engine.stats();
}

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (fs::exists(kQwen3 + "/config.json")) qwen3_ = Transformer::load(kQwen3).value().release();
  }
  static void TearDownTestSuite() {
    delete qwen3_;
    qwen3_ = nullptr;
  }
  void SetUp() override {
    if (qwen3_ == nullptr) GTEST_SKIP() << "qwen3 fixture not generated";
  }
  static EngineOptions options(int64_t kv_pages, int32_t page_size = 4) {
    EngineOptions o;
    o.model_dir = kQwen3;
    o.page_size = page_size;
    o.kv_pages = kv_pages;
    o.max_running = 16;
    o.prefill_chunk = 256;
    o.max_step_tokens = 512;
    return o;
  }
  // The mixed workload: prompts of 30..130 tokens, one policy each.
  static std::vector<RequestParams> mixed_requests(int64_t max_new) {
    const std::vector<CompressConfig> configs = {
        CompressConfig{},
        policy(KvPolicy::kSnapKv, 24, 8),
        policy(KvPolicy::kAdaSnapKv, 24, 8),
        policy(KvPolicy::kKvCompress, 20, 8),
        policy(KvPolicy::kStreamingLlm, 24, 8),
        policy(KvPolicy::kH2o, 24, 8),
        policy(KvPolicy::kAdaPyramidKv, 32, 8),
        policy(KvPolicy::kCriticalKv, 24, 8),
        CompressConfig{},
        policy(KvPolicy::kAdaSnapKv, 40, 8),
    };
    std::vector<RequestParams> reqs;
    for (size_t i = 0; i < configs.size(); ++i) {
      RequestParams p;
      p.prompt = tokens_for(qwen3_->config().vocab_size, 30 + static_cast<int64_t>(i) * 11, static_cast<uint32_t>(i + 1));
      p.max_new_tokens = max_new;
      p.ignore_eos = true;
      p.compress = configs[i];
      reqs.push_back(p);
    }
    return reqs;
  }
  static std::map<size_t, Outcome> run_all(Engine& engine, const std::vector<RequestParams>& reqs) {
    Collector c;
    for (size_t i = 0; i < reqs.size(); ++i) {
      Expected<RequestId> id = engine.submit(reqs[i], c.callback(i));
      EXPECT_TRUE(id.has_value()) << id.status().message();
    }
    EXPECT_TRUE(c.wait(reqs.size()));
    return c.outcomes();
  }
  static Transformer* qwen3_;
};
Transformer* EngineTest::qwen3_ = nullptr;

TEST_F(EngineTest, ConcurrentRequestsWithTheirOwnPoliciesMatchGenerate) {
  const std::vector<RequestParams> reqs = mixed_requests(20);
  auto engine = Engine::create(options(4096)).value();
  const auto out = run_all(*engine, reqs);
  int compressed = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Outcome& o = out.at(i);
    SCOPED_TRACE(std::string("request ") + std::to_string(i) + " " + kv_policy_name(reqs[i].compress.policy));
    EXPECT_EQ(o.reason, FinishReason::kLength) << o.error.message();
    EXPECT_EQ(o.finished_events, 1);
    EXPECT_EQ(o.tokens, reference(*qwen3_, reqs[i], 4));
    EXPECT_EQ(o.usage.prompt_tokens, static_cast<int64_t>(reqs[i].prompt.size()));
    EXPECT_EQ(o.usage.generated_tokens, 20);
    // Each request's cache was compressed by its own policy, not by a shared one.
    if (policy_compresses(reqs[i].compress.policy)) {
      EXPECT_LT(o.usage.kv_entries, o.usage.kv_full_entries);
      ++compressed;
    } else {
      EXPECT_EQ(o.usage.kv_entries, o.usage.kv_full_entries);
    }
  }
  EXPECT_EQ(compressed, 8);
  const EngineStats s = settled_stats(*engine, 10);
  EXPECT_EQ(s.requests_total, 10);
  EXPECT_EQ(s.requests_finished, 10);
  EXPECT_EQ(s.generated_tokens_total, 200);
  EXPECT_EQ(s.kv_pages_used, 0);
  EXPECT_GT(s.peak_running, 1);  // they really ran together
  EXPECT_GT(s.kv_entries_evicted_total, 0);
}

TEST_F(EngineTest, ChunkedPrefillMatchesOneStepPrefill) {
  // Prompts of 30..129 tokens in chunks of 8: every policy's compression waits for the last
  // chunk and sees the same queries and keys as a one-step prefill. Most last chunks are
  // shorter than the window of 8 (and H2O needs every query), so the earlier chunks' queries
  // must have been kept.
  const std::vector<RequestParams> reqs = mixed_requests(12);
  EngineOptions o = options(4096);
  o.prefill_chunk = 8;
  o.max_step_tokens = 16 + 8;
  auto engine = Engine::create(o).value();
  const auto out = run_all(*engine, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(std::string("request ") + std::to_string(i) + " " + kv_policy_name(reqs[i].compress.policy));
    EXPECT_EQ(out.at(i).reason, FinishReason::kLength) << out.at(i).error.message();
    EXPECT_EQ(out.at(i).tokens, reference(*qwen3_, reqs[i], 4));
  }
}

TEST_F(EngineTest, SmallPoolWaitsAndPreemptsWithIdenticalGreedyOutput) {
  // 8 requests of 40..75 prompt tokens + 40 new, most with the full cache: one full request at
  // its end holds 2 layers x 2 kv heads x 29 pages = 116 pages; 260 pages hold two of them.
  // Requests 3 and 6 compress once after the prefill (recompute re-prefills and re-compresses
  // the prompt, then re-appends the generated tokens).
  std::vector<RequestParams> reqs;
  for (int i = 0; i < 8; ++i) {
    RequestParams p;
    p.prompt = tokens_for(qwen3_->config().vocab_size, 40 + 5 * i, 100 + i);
    p.max_new_tokens = 40;
    p.ignore_eos = true;
    if (i == 3) p.compress = policy(KvPolicy::kAdaSnapKv, 24, 8);
    if (i == 6) p.compress = policy(KvPolicy::kSnapKv, 16, 8);
    reqs.push_back(p);
  }
  EngineOptions o = options(260);
  o.prefill_chunk = 32;
  o.max_step_tokens = 64;
  auto engine = Engine::create(o).value();
  const auto out = run_all(*engine, reqs);
  int preempted = 0;
  int compressed_preempted = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    EXPECT_EQ(out.at(i).reason, FinishReason::kLength) << out.at(i).error.message();
    EXPECT_EQ(out.at(i).tokens, reference(*qwen3_, reqs[i], 4));
    preempted += out.at(i).usage.preemptions;
    if (i == 3 || i == 6) compressed_preempted += out.at(i).usage.preemptions;
  }
  EXPECT_GT(compressed_preempted, 0);
  const EngineStats s = settled_stats(*engine, 8);
  EXPECT_GT(s.preemptions_total, 0);  // not by construction: the pool forced recomputes
  EXPECT_EQ(s.preemptions_total, preempted);
  EXPECT_LT(s.peak_running, 8);       // some had to wait (Later)
  EXPECT_LE(s.peak_kv_pages_used, 260);
  EXPECT_EQ(s.kv_pages_used, 0);
}

TEST_F(EngineTest, SeededSamplingSurvivesPreemption) {
  // The sampler travels with the request: a preempted, recomputed request draws the same
  // tokens as one that never was.
  std::vector<RequestParams> reqs;
  for (int i = 0; i < 6; ++i) {
    RequestParams p;
    p.prompt = tokens_for(qwen3_->config().vocab_size, 50, 200 + i);
    p.max_new_tokens = 40;
    p.ignore_eos = true;
    p.sampling.temperature = 1.0f;
    p.sampling.top_k = 20;
    p.sampling.seed = 7 + i;
    reqs.push_back(p);
  }
  auto roomy = Engine::create(options(4096)).value();
  EngineOptions o = options(200);
  o.prefill_chunk = 32;
  o.max_step_tokens = 64;
  auto tight = Engine::create(o).value();
  const auto a = run_all(*roomy, reqs);
  const auto b = run_all(*tight, reqs);
  EXPECT_GT(settled_stats(*tight, 6).preemptions_total, 0);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(a.at(i).tokens, b.at(i).tokens) << "request " << i;
}

TEST_F(EngineTest, CompressedRequestsUnderPressureCompressBeforePreempting) {
  // KV-Compress requests in a pool that cannot hold their full caches: compress_now frees
  // pages; every request completes, and the pool ends empty.
  std::vector<RequestParams> reqs;
  for (int i = 0; i < 6; ++i) {
    RequestParams p;
    p.prompt = tokens_for(qwen3_->config().vocab_size, 60, 300 + i);
    p.max_new_tokens = 60;
    p.ignore_eos = true;
    p.compress = policy(KvPolicy::kKvCompress, 24, 8);
    p.compress.interval = 64;  // rarely on its own: pressure has to trigger it
    reqs.push_back(p);
  }
  EngineOptions o = options(200);
  o.prefill_chunk = 64;
  o.max_step_tokens = 128;
  auto engine = Engine::create(o).value();
  const auto out = run_all(*engine, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(out.at(i).reason, FinishReason::kLength) << out.at(i).error.message();
    EXPECT_EQ(out.at(i).tokens.size(), 60u);
  }
  const EngineStats s = settled_stats(*engine, 6);
  EXPECT_EQ(s.kv_pages_used, 0);
  EXPECT_GE(s.peak_running, 4);  // 6 x 120 full tokens would need 360 pages
}

TEST_F(EngineTest, RefusesWhatCanNeverRunWithClearErrors) {
  auto engine = Engine::create(options(40)).value();  // 40 pages = 4 rows x 10 pages = 40 tokens
  Collector c;
  RequestParams p;
  p.max_new_tokens = 4;
  auto expect_error = [&](const RequestParams& r, const std::string& needle) {
    Expected<RequestId> id = engine->submit(r, c.callback(0));
    ASSERT_FALSE(id.has_value()) << needle;
    EXPECT_NE(id.status().message().find(needle), std::string::npos) << id.status().message();
  };
  expect_error(p, "prompt is empty");
  p.prompt = tokens_for(qwen3_->config().vocab_size, 41, 1);
  expect_error(p, "prompt of 41 tokens can never fit the KV cache");
  expect_error(p, "the pool holds 40 pages");
  p.prompt = {1, 2, static_cast<int32_t>(qwen3_->config().vocab_size)};
  expect_error(p, "outside the vocabulary");
  p.prompt = {1, 2, 3};
  p.max_new_tokens = 0;
  expect_error(p, "max_new_tokens must be >= 1");
  p.max_new_tokens = 254;
  expect_error(p, "exceeds the model's context of 256");
  p.max_new_tokens = 4;
  p.sampling.temperature = -1.0f;
  expect_error(p, "temperature");
  p.sampling.temperature = 0.0f;
  p.compress = CompressConfig{};
  p.compress.policy = KvPolicy::kSnapKv;
  p.compress.budget = 8;
  p.compress.window = 8;
  expect_error(p, "--kv-budget 8 is out of range");
  // A prompt that fits is still accepted: the refusals changed nothing.
  p.compress = CompressConfig{};
  Collector ok;
  ASSERT_TRUE(engine->submit(p, ok.callback(0)).has_value());
  ASSERT_TRUE(ok.wait(1));
  EXPECT_EQ(ok.outcomes().at(0).reason, FinishReason::kLength);
}

TEST_F(EngineTest, BadOptionsAreErrors) {
  auto expect_error = [](EngineOptions o, const std::string& needle) {
    auto e = Engine::create(o);
    ASSERT_FALSE(e.has_value()) << needle;
    EXPECT_NE(e.status().message().find(needle), std::string::npos) << e.status().message();
  };
  EngineOptions o = options(100);
  o.max_step_tokens = 100;
  expect_error(o, "max_step_tokens 100 is less than max_running 16 + prefill_chunk 256");
  o = options(100);
  o.page_size = 0;
  expect_error(o, "page_size 0 is out of range");
  o = options(100);
  o.device = "tpu";
  expect_error(o, "device 'tpu' is not known");
  o = options(100);
  o.model_dir = "/nonexistent/model";
  expect_error(o, "/nonexistent/model");
  o = options(0);
  o.kv_memory_bytes = 100;
  expect_error(o, "less than one page");
  o = options(100);
  o.default_compress.policy = KvPolicy::kSnapKv;
  expect_error(o, "default compression");
}

TEST_F(EngineTest, CancelEndsRequestsAndFreesTheirPages) {
  auto engine = Engine::create(options(4096)).value();
  Collector c;
  c.hold();
  std::vector<RequestId> ids;
  for (int i = 0; i < 4; ++i) {
    RequestParams p;
    p.prompt = tokens_for(qwen3_->config().vocab_size, 60, 400 + i);
    p.max_new_tokens = 180;
    p.ignore_eos = true;
    ids.push_back(engine->submit(p, c.callback(static_cast<size_t>(i))).value());
  }
  ASSERT_TRUE(c.wait_held());
  for (RequestId id : ids) engine->cancel(id);
  engine->cancel(ids[0]);  // twice, and an unknown id: ignored
  engine->cancel(987654);
  c.release();
  ASSERT_TRUE(c.wait(4));
  for (const auto& [i, o] : c.outcomes()) {
    EXPECT_EQ(o.reason, FinishReason::kCancelled) << i;
    EXPECT_EQ(o.finished_events, 1) << i;
    EXPECT_LE(o.tokens.size(), 1u) << i;  // cancelled at the start of the next step
  }
  const EngineStats s = settled_stats(*engine, 4);
  EXPECT_EQ(s.kv_pages_used, 0);
  EXPECT_EQ(s.requests_running, 0);
}

TEST_F(EngineTest, ShutdownDrainFinishesAndShutdownCancelCancels) {
  const std::vector<RequestParams> reqs = mixed_requests(10);
  {
    auto engine = Engine::create(options(4096)).value();
    Collector c;
    for (size_t i = 0; i < reqs.size(); ++i) ASSERT_TRUE(engine->submit(reqs[i], c.callback(i)).has_value());
    engine->shutdown(/*drain=*/true);
    auto out = c.outcomes();
    ASSERT_EQ(out.size(), reqs.size());
    for (const auto& [i, o] : out) {
      EXPECT_EQ(o.reason, FinishReason::kLength) << i;
      EXPECT_EQ(o.tokens.size(), 10u) << i;
    }
    Expected<RequestId> late = engine->submit(reqs[0], c.callback(99));
    ASSERT_FALSE(late.has_value());
    EXPECT_NE(late.status().message().find("shutting down"), std::string::npos);
    engine->shutdown(/*drain=*/false);  // idempotent
  }
  {
    auto engine = Engine::create(options(4096)).value();
    Collector c;
    RequestParams p = reqs[0];
    p.max_new_tokens = 200;
    c.hold();
    for (size_t i = 0; i < 5; ++i) ASSERT_TRUE(engine->submit(p, c.callback(i)).has_value());
    ASSERT_TRUE(c.wait_held());
    std::thread stopper([&] { engine->shutdown(/*drain=*/false); });
    // shutdown() waits for the scheduler thread, which is held: let it go once the stop order
    // is in (a short sleep suffices; a late release only means a later stop).
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    c.release();
    stopper.join();
    auto out = c.outcomes();
    ASSERT_EQ(out.size(), 5u);
    for (const auto& [i, o] : out) {
      EXPECT_EQ(o.reason, FinishReason::kCancelled) << i;
      EXPECT_EQ(o.finished_events, 1) << i;
    }
    EXPECT_EQ(engine->stats().kv_pages_used, 0);
  }
}

TEST_F(EngineTest, CallbacksMayThrowOrShutDownTheEngine) {
  auto engine = Engine::create(options(4096)).value();
  RequestParams p;
  p.prompt = tokens_for(qwen3_->config().vocab_size, 20, 9);
  p.max_new_tokens = 5;
  p.ignore_eos = true;
  // A throwing callback costs its own events, never the other requests.
  ASSERT_TRUE(engine->submit(p, [](const TokenEvent&) { throw std::runtime_error("client bug"); }).has_value());
  Collector c;
  ASSERT_TRUE(engine->submit(p, c.callback(0)).has_value());
  ASSERT_TRUE(c.wait(1));
  EXPECT_EQ(c.outcomes().at(0).tokens.size(), 5u);
  // shutdown() from the scheduler thread itself (inside an event) must not deadlock.
  Collector d;
  Engine* raw = engine.get();
  TokenCallback inner = d.callback(0);
  p.max_new_tokens = 50;
  ASSERT_TRUE(engine->submit(p, [raw, inner](const TokenEvent& e) {
                       inner(e);
                       if (!e.finished) raw->shutdown(/*drain=*/false);
                     }).has_value());
  ASSERT_TRUE(d.wait(1));
  EXPECT_EQ(d.outcomes().at(0).reason, FinishReason::kCancelled);
  EXPECT_FALSE(engine->submit(p, c.callback(1)).has_value());
  engine->shutdown(/*drain=*/true);  // joins the thread that stopped itself
}

TEST_F(EngineTest, StopTokensEndWithoutEmittingThem) {
  RequestParams p;
  p.prompt = tokens_for(qwen3_->config().vocab_size, 30, 5);
  p.max_new_tokens = 12;
  p.ignore_eos = true;
  const std::vector<int32_t> free_run = reference(*qwen3_, p, 4);
  ASSERT_EQ(free_run.size(), 12u);
  p.ignore_eos = false;
  p.stop_ids = {free_run[5]};
  const size_t first = static_cast<size_t>(std::find(free_run.begin(), free_run.end(), free_run[5]) - free_run.begin());
  auto engine = Engine::create(options(4096)).value();
  const auto out = run_all(*engine, {p});
  EXPECT_EQ(out.at(0).reason, FinishReason::kStop);
  EXPECT_EQ(out.at(0).tokens, std::vector<int32_t>(free_run.begin(), free_run.begin() + static_cast<int64_t>(first)));
}

// The scheduler without the engine's thread: the pool between steps.
TEST_F(EngineTest, SchedulerCancelFreesEveryPageBetweenSteps) {
  CpuRunnerOptions ro;
  ro.page_size = 4;
  ro.kv_pages = 300;
  auto runner = create_cpu_model_runner(kQwen3, ro).value();
  SchedulerOptions so;
  so.max_running = 8;
  so.prefill_chunk = 16;
  so.max_step_tokens = 32;
  Scheduler sched(*runner, so);
  Collector c;
  for (int i = 0; i < 5; ++i) {
    RequestParams p;
    p.prompt = tokens_for(qwen3_->config().vocab_size, 50, 500 + i);
    p.max_new_tokens = 100;
    p.compress = i % 2 == 0 ? CompressConfig{} : policy(KvPolicy::kAdaSnapKv, 24, 8);
    auto r = std::make_unique<EngineRequest>(i + 1, p, c.callback(static_cast<size_t>(i)));
    r->tokens = p.prompt;
    r->prompt_length = 50;
    r->submitted = EngineClock::now();
    sched.add(std::move(r));
  }
  for (int s = 0; s < 12; ++s) {
    sched.step();
    ASSERT_EQ(runner->kv().check_consistency(), "");
  }
  EXPECT_GT(runner->kv().used_pages(), 0);
  EXPECT_GT(sched.counters().requests_running, 1);
  for (int i = 1; i <= 5; ++i) sched.cancel(i);
  EXPECT_EQ(runner->kv().used_pages(), 0);
  EXPECT_EQ(runner->kv().num_sequences(), 0);
  EXPECT_EQ(runner->kv().check_consistency(), "");
  EXPECT_TRUE(sched.idle());
  ASSERT_TRUE(c.wait(5, std::chrono::seconds(1)));
  for (const auto& [i, o] : c.outcomes()) EXPECT_EQ(o.reason, FinishReason::kCancelled) << i;
}

// The shipped model: longer prompts in chunks, a KV limit, mixed policies.
TEST(EngineShippedModel, MixedPoliciesUnderAKvLimitMatchGenerate) {
  if (!fs::exists(kTiny + "/config.json")) GTEST_SKIP() << "models/adakv-tiny-v1 missing";
  auto model = Transformer::load(kTiny).value();
  const std::vector<CompressConfig> configs = {CompressConfig{}, policy(KvPolicy::kAdaSnapKv, 64, 16),
                                               policy(KvPolicy::kSnapKv, 64, 16), CompressConfig{},
                                               policy(KvPolicy::kAdaSnapKv, 96, 16)};
  std::vector<RequestParams> reqs;
  for (size_t i = 0; i < configs.size(); ++i) {
    RequestParams p;
    p.prompt = tokens_for(model->config().vocab_size, 200 + 40 * static_cast<int64_t>(i), 600 + static_cast<uint32_t>(i));
    p.max_new_tokens = 24;
    p.ignore_eos = true;
    p.compress = configs[i];
    reqs.push_back(p);
  }
  EngineOptions o;
  o.model_dir = kTiny;
  o.page_size = 16;
  // Full cache of the longest request: 8 layers x 2 heads x 25 pages = 400; 900 pages hold two.
  o.kv_pages = 900;
  o.max_running = 8;
  o.prefill_chunk = 128;
  o.max_step_tokens = 256;
  auto engine = Engine::create(o).value();
  Collector c;
  for (size_t i = 0; i < reqs.size(); ++i) ASSERT_TRUE(engine->submit(reqs[i], c.callback(i)).has_value());
  ASSERT_TRUE(c.wait(reqs.size()));
  const auto out = c.outcomes();
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(std::string("request ") + std::to_string(i) + " " + kv_policy_name(reqs[i].compress.policy));
    EXPECT_EQ(out.at(i).reason, FinishReason::kLength) << out.at(i).error.message();
    GenerateOptions g;
    g.max_new_tokens = 24;
    g.ignore_eos = true;
    g.page_size = 16;
    g.compress = &reqs[i].compress;
    EXPECT_EQ(out.at(i).tokens, generate(*model, reqs[i].prompt, g, nullptr).value().tokens);
  }
  const EngineStats s = settled_stats(*engine, 5);
  EXPECT_GT(s.peak_running, 1);
  EXPECT_LT(s.peak_running, 5);  // the limit made some wait
  EXPECT_LE(s.peak_kv_pages_used, 900);
  EXPECT_EQ(s.kv_pages_used, 0);
}

}  // namespace
}  // namespace adakv
