// The engine on the CUDA runner (src/backends/cuda/cuda_model_runner.h) with models/adakv-tiny-v1:
// each request's greedy output against the same request run alone on a CudaModel (the same
// chunks, the same device code: what `generate --device cuda` runs, chunked like the engine);
// compression after a chunked prefill against the host policy on the same bf16 inputs; many
// concurrent requests with their own policies; a pool so small that requests wait and are
// preempted; pages all returned; refusals. Without a CUDA device every test skips.
#include <gtest/gtest.h>

#if ADAKV_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "adakv/engine.h"
#include "backends/cuda/cuda_model.h"
#include "compress/policy.h"
#include "core/dtype.h"
#include "core/mapped_file.h"
#include "engine/model_runner_factory.h"
#include "engine/sampler.h"
#include "io/tokenizer.h"
#include "kv/kv_cache_manager.h"
#include "cuda_test_support.h"
#include "host_policy_check.h"

namespace adakv {
namespace {

namespace fs = std::filesystem;

#define SKIP_WITHOUT_DEVICE()                                                           \
  if (!have_device()) GTEST_SKIP() << "no CUDA device: CUDA runner tests skipped";      \
  if (!fs::exists(kTiny / "config.json")) GTEST_SKIP() << "models/adakv-tiny-v1 missing"

const fs::path kTiny = fs::path(ADAKV_SOURCE_DIR) / "models" / "adakv-tiny-v1";
const fs::path kHaystack = fs::path(ADAKV_SOURCE_DIR) / "data" / "haystack" / "validation.txt";

constexpr int32_t kChunk = 128;       // the engine's prefill chunk in every test
constexpr float kTieMargin = 0.25f;   // logits: a greedy divergence below this top-2 margin is a near-tie

// Stretches of held-out text (real text: fewer near-ties than random ids), BOS first.
std::vector<std::vector<int32_t>> text_prompts(const std::vector<int32_t>& lengths) {
  auto tok = Tokenizer::load(kTiny.string()).value();
  const std::string text = read_text_file(kHaystack.string()).value();
  const std::vector<int32_t> ids = tok->encode(std::string_view(text).substr(0, 200000), false);
  std::vector<std::vector<int32_t>> out;
  size_t at = 0;
  for (int32_t n : lengths) {
    std::vector<int32_t> p{tok->bos_id() >= 0 ? tok->bos_id() : 0};
    for (int32_t i = 1; i < n; ++i) p.push_back(ids[(at + static_cast<size_t>(i)) % ids.size()]);
    at += static_cast<size_t>(n) * 3 + 17;
    out.push_back(std::move(p));
  }
  return out;
}

CompressConfig make_policy(const char* name, int32_t budget = 96, int32_t window = 16) {
  CompressConfig c;
  c.policy = parse_kv_policy(name).value();
  if (c.policy != KvPolicy::kFull) c.budget = budget;
  c.window = window;
  c.interval = 8;
  c.sink = 4;
  EXPECT_TRUE(validate_compress_config(c).is_ok()) << name;
  return c;
}

// The runner's CudaModel options for an engine of max_running `seqs` and `pages` pages, so that
// the reference runs the very same kernels (cuBLASLt picks by shape, the decode plan by rows).
cuda::CudaModelOptions runner_like(int32_t seqs, int64_t pages) {
  cuda::CudaModelOptions o;
  o.max_seqs = seqs;
  o.max_step_tokens = seqs + kChunk;
  o.max_logit_rows = seqs;
  o.max_window = 32;
  o.num_pages = pages;
  return o;
}

struct Reference {
  std::vector<int32_t> tokens;
  std::vector<float> margin;  // [tokens] top-1 minus top-2 logit at each greedy choice
  int64_t kv_entries = 0;     // after the last step
};

float top2_margin(std::span<const float> l) {
  float a = -INFINITY, b = -INFINITY;
  for (float v : l) {
    if (v > a) {
      b = a;
      a = v;
    } else if (v > b) {
      b = v;
    }
  }
  return a - b;
}

// One request alone on a CudaModel, as the engine feeds it: prompt chunks at multiples of
// kChunk (compressed after the last), then one greedy token per step; streamingllm compresses
// every `interval` decode steps.
Reference run_alone(cuda::CudaModel& m, const std::vector<int32_t>& prompt, const CompressConfig& cc, int32_t n_new) {
  Reference ref;
  KvCacheManager mgr(m.kv_layout(), m.num_pages());
  const SeqId seq = mgr.add_sequence();
  EXPECT_TRUE(m.set_compression(seq, cc).is_ok());
  cuda::StepResult out;
  const int64_t vocab = m.config().vocab_size;
  const Status st = step_prompt(m, mgr, seq, prompt, kChunk, true, nullptr, &out);
  EXPECT_TRUE(st.is_ok()) << st.message();
  if (!st.is_ok()) return ref;
  int64_t decodes = 0;
  for (;;) {
    const std::span<const float> logits(out.logits.data(), static_cast<size_t>(vocab));
    const int32_t next = argmax(logits);
    ref.tokens.push_back(next);
    ref.margin.push_back(top2_margin(logits));
    if (static_cast<int32_t>(ref.tokens.size()) == n_new) break;
    cuda::SeqStep s;
    s.seq = seq;
    s.tokens = std::span<const int32_t>(&ref.tokens.back(), 1);
    const Status st = m.step({&s, 1}, mgr, true, &out);
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (!st.is_ok()) return ref;
    if (policy_is_continual(cc.policy) && ++decodes % cc.interval == 0) {
      EXPECT_TRUE(m.compress_streaming(seq, mgr).is_ok());
    }
  }
  for (int32_t l = 0; l < mgr.layout().num_layers; ++l)
    for (int32_t h = 0; h < mgr.layout().num_kv_heads; ++h) ref.kv_entries += mgr.length(seq, l, h);
  mgr.release(seq);
  m.on_release(seq);
  return ref;
}

struct Outcome {
  std::vector<int32_t> tokens;
  FinishReason reason = FinishReason::kNone;
  std::string error;
  RequestUsage usage;
};

class Collector {
 public:
  TokenCallback callback(size_t i) {
    return [this, i](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      Outcome& o = out_[i];
      if (e.token >= 0) o.tokens.push_back(e.token);
      o.usage = e.usage;
      if (e.finished) {
        o.reason = e.reason;
        o.error = e.error.message();
        ++finished_;
        cv_.notify_all();
      }
    };
  }
  bool wait(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(240), [&] { return finished_ >= n; });
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
};

EngineOptions engine_options(int32_t max_running, int64_t pages) {
  EngineOptions o;
  o.model_dir = kTiny.string();
  o.device = "cuda";
  o.kv_pages = pages;
  o.max_running = max_running;
  o.prefill_chunk = kChunk;
  o.max_step_tokens = max_running + kChunk;
  return o;
}

RequestParams request(const std::vector<int32_t>& prompt, const CompressConfig& cc, int32_t n_new) {
  RequestParams p;
  p.prompt = prompt;
  p.max_new_tokens = n_new;
  p.ignore_eos = true;
  p.compress = cc;
  return p;
}

// Exact where the reference's choice was clear; a divergence only at a near-tie (the engine
// batches sequences, so GEMM shapes and the decode plan differ from the reference's in the last
// bits). Returns whether the whole output was equal.
bool compare(const Outcome& got, const Reference& ref, const std::string& what, int* near_ties) {
  EXPECT_EQ(got.reason, FinishReason::kLength) << what << ": " << got.error;
  EXPECT_EQ(got.tokens.size(), ref.tokens.size()) << what;
  for (size_t i = 0; i < std::min(got.tokens.size(), ref.tokens.size()); ++i) {
    if (got.tokens[i] == ref.tokens[i]) continue;
    std::printf("  %s: diverges at token %zu (reference margin %.4f)\n", what.c_str(), i, ref.margin[i]);
    EXPECT_LT(ref.margin[i], kTieMargin) << what << ": greedy output differs at token " << i
                                         << " where the reference's choice was clear";
    ++*near_ties;
    return false;
  }
  return got.tokens.size() == ref.tokens.size();
}

// Compression after a chunked prefill: the device's keep sets equal the host policy on the same
// bf16 queries (the window assembled from the ring when the last chunk is shorter than it) and
// keys (read back from the pages), except near-ties; the manager's rows hold the kept entries.
TEST(CudaRunner, ChunkedPrefillCompressionMatchesHostPolicy) {
  SKIP_WITHOUT_DEVICE();
  for (const int32_t length : {700, 645}) {  // last chunks of 60 and 5 tokens; window 16
    for (const char* name : {"ada-snapkv", "snapkv", "pyramidkv"}) {
      const CompressConfig cc = make_policy(name, 96, 16);
      cuda::CudaModelOptions o = runner_like(2, 4096);
      o.audit_compression = true;
      auto gpu = cuda::CudaModel::load(kTiny.string(), o);
      ASSERT_TRUE(gpu.has_value()) << gpu.status().message();
      cuda::CudaModel& m = **gpu;
      const ModelConfig& c = m.config();
      const std::vector<int32_t> prompt = text_prompts({length})[0];
      KvCacheManager mgr(m.kv_layout(), m.num_pages());
      const SeqId seq = mgr.add_sequence();
      ASSERT_TRUE(m.set_compression(seq, cc).is_ok());
      cuda::StepResult out;
      const Status st = step_prompt(m, mgr, seq, prompt, kChunk, false, nullptr, &out);
      ASSERT_TRUE(st.is_ok()) << st.message();
      const auto& audit = m.compression_audit();
      ASSERT_EQ(audit.size(), size_t(c.num_layers)) << name;
      const int32_t H = int32_t(c.num_heads), Hkv = int32_t(c.num_kv_heads), d = int32_t(c.head_dim);
      KeepSetComparison cmp;
      for (const cuda::CompressionAuditLayer& a : audit) {
        ASSERT_EQ(a.length, length);
        for (int32_t h = 0; h < Hkv; ++h) EXPECT_EQ(mgr.length(seq, a.layer, h), int32_t(a.keep[size_t(h)].size()));
        const Status hst = compare_with_host_policy(cc, a, H, Hkv, d, &cmp);
        ASSERT_TRUE(hst.is_ok()) << hst.message();
      }
      std::printf("  prompt %d in chunks of %d, %-10s: %lld kept over %d layers; device vs host policy on the same "
                  "inputs: %lld differ (%lld near-ties)\n",
                  length, kChunk, name, static_cast<long long>(cmp.kept), int(audit.size()),
                  static_cast<long long>(cmp.differ), static_cast<long long>(cmp.near_tie));
      EXPECT_GT(cmp.kept, 0);
      EXPECT_EQ(cmp.differ, cmp.near_tie) << name << ": keep-set differences not explained by near-ties";
      // Decoding goes on over the compacted rows.
      const int32_t next = prompt[5];
      cuda::SeqStep s;
      s.seq = seq;
      s.tokens = std::span<const int32_t>(&next, 1);
      ASSERT_TRUE(m.step({&s, 1}, mgr, true, &out).is_ok());
      for (float v : out.logits) ASSERT_TRUE(std::isfinite(v));
    }
  }
}

// One request at a time through the engine runs exactly the reference's device steps: the
// outputs are identical token for token, for every policy the device runs.
TEST(CudaRunner, EngineAloneEqualsCudaModelAlone) {
  SKIP_WITHOUT_DEVICE();
  const int64_t pages = 8192;
  auto ref_model = cuda::CudaModel::load(kTiny.string(), runner_like(8, pages));
  ASSERT_TRUE(ref_model.has_value()) << ref_model.status().message();
  auto engine = Engine::create(engine_options(8, pages));
  ASSERT_TRUE(engine.has_value()) << engine.status().message();
  const std::vector<std::vector<int32_t>> prompts = text_prompts({600, 389});
  for (const char* name : {"full", "snapkv", "ada-snapkv", "streamingllm", "kvcompress"}) {
    for (size_t i = 0; i < prompts.size(); ++i) {
      const CompressConfig cc = make_policy(name);
      const Reference ref = run_alone(**ref_model, prompts[i], cc, 24);
      Collector col;
      ASSERT_TRUE((*engine)->submit(request(prompts[i], cc, 24), col.callback(0)).has_value());
      ASSERT_TRUE(col.wait(1));
      const Outcome got = col.outcomes()[0];
      EXPECT_EQ(got.reason, FinishReason::kLength) << got.error;
      EXPECT_EQ(got.tokens, ref.tokens) << name << " prompt " << prompts[i].size();
      EXPECT_EQ(got.usage.kv_entries, ref.kv_entries) << name;
    }
    std::printf("  %-12s alone: engine == CudaModel\n", name);
  }
  (*engine)->shutdown(true);
  EXPECT_EQ((*engine)->stats().kv_pages_used, 0);
}

// The metric, CriticalKV and random policies through the engine, several requests at once, each
// with its own policy, prompts of one chunk and of several (chunked prefill: H2O's metric grows
// chunk by chunk, the CriticalKV pair read their window from the ring and their values from the
// pages); outputs equal to each alone (or diverge at a near-tie); all pages come back.
TEST(CudaRunner, MetricPoliciesPerRequestComplete) {
  SKIP_WITHOUT_DEVICE();
  const int64_t pages = 8192;
  const int32_t running = 8;
  const char* names[] = {"h2o", "kvcompress", "criticalkv", "ada-criticalkv", "h2o", "kvcompress", "h2o", "criticalkv",
                         "ada-criticalkv", "random", "random"};
  const std::vector<int32_t> lengths = {120, 500, 110, 127, 97, 333, 300, 645, 520, 100, 400};
  const std::vector<std::vector<int32_t>> prompts = text_prompts(lengths);
  auto ref_model = cuda::CudaModel::load(kTiny.string(), runner_like(running, pages));
  ASSERT_TRUE(ref_model.has_value()) << ref_model.status().message();
  std::vector<Reference> refs;
  for (size_t i = 0; i < prompts.size(); ++i) refs.push_back(run_alone(**ref_model, prompts[i], make_policy(names[i]), 24));
  auto engine = Engine::create(engine_options(running, pages));
  ASSERT_TRUE(engine.has_value()) << engine.status().message();
  Collector col;
  for (size_t i = 0; i < prompts.size(); ++i)
    ASSERT_TRUE((*engine)->submit(request(prompts[i], make_policy(names[i]), 24), col.callback(i)).has_value());
  ASSERT_TRUE(col.wait(prompts.size()));
  const auto outs = col.outcomes();
  int equal = 0, ties = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(outs.at(i).reason, FinishReason::kLength) << names[i] << ": " << outs.at(i).error;
    equal += compare(outs.at(i), refs[i], std::string(names[i]) + " #" + std::to_string(i), &ties);
  }
  std::printf("  %zu requests (h2o, kvcompress, criticalkv, ada-criticalkv, random; prompts of 1-6 chunks): %d equal "
              "to alone, %d diverge at near-ties\n",
              prompts.size(), equal, ties);
  (*engine)->shutdown(true);
  EXPECT_EQ((*engine)->stats().kv_pages_used, 0) << "pages not returned";
}

// Many requests at once, each with its own policy, in one batched device step per engine step.
TEST(CudaRunner, ConcurrentPerRequestPoliciesMatchAlone) {
  SKIP_WITHOUT_DEVICE();
  const int64_t pages = 16384;
  const int32_t running = 16;
  std::vector<int32_t> lengths;
  for (int i = 0; i < 16; ++i) lengths.push_back(150 + 53 * i);  // 150 .. 945: every chunk tail
  const std::vector<std::vector<int32_t>> prompts = text_prompts(lengths);
  const char* names[] = {"full", "snapkv", "ada-snapkv", "streamingllm"};
  auto ref_model = cuda::CudaModel::load(kTiny.string(), runner_like(running, pages));
  ASSERT_TRUE(ref_model.has_value()) << ref_model.status().message();
  std::vector<Reference> refs;
  for (size_t i = 0; i < prompts.size(); ++i) refs.push_back(run_alone(**ref_model, prompts[i], make_policy(names[i % 4]), 32));
  auto engine = Engine::create(engine_options(running, pages));
  ASSERT_TRUE(engine.has_value()) << engine.status().message();
  Collector col;
  for (size_t i = 0; i < prompts.size(); ++i)
    ASSERT_TRUE((*engine)->submit(request(prompts[i], make_policy(names[i % 4]), 32), col.callback(i)).has_value());
  ASSERT_TRUE(col.wait(prompts.size()));
  const auto outs = col.outcomes();
  int equal = 0, ties = 0;
  for (size_t i = 0; i < prompts.size(); ++i)
    equal += compare(outs.at(i), refs[i], std::string(names[i % 4]) + " #" + std::to_string(i), &ties);
  const EngineStats st = (*engine)->stats();
  std::printf("  %zu concurrent requests (peak running %lld): %d of %zu outputs equal to alone, %d diverge at "
              "near-ties\n",
              prompts.size(), static_cast<long long>(st.peak_running), equal, prompts.size(), ties);
  EXPECT_GE(st.peak_running, 8);
  (*engine)->shutdown(true);
  EXPECT_EQ((*engine)->stats().kv_pages_used, 0) << "pages not returned";
}

// A pool that admits two of these prompts but cannot hold two finished requests: the rest wait,
// decode growth preempts (recompute), and the full cache's greedy outputs stay those of each
// request alone.
TEST(CudaRunner, SmallPoolWaitsAndPreemptsFullCacheStaysEqual) {
  SKIP_WITHOUT_DEVICE();
  const int32_t running = 8;
  const std::vector<std::vector<int32_t>> prompts = text_prompts({300, 310, 290, 305, 295, 300});
  const int32_t n_new = 48;
  // 16 rows x 20 pages = 320 per prompt (admission), 16 x ceil(358 / 16) = 368 at the end.
  const int64_t pages = 680;
  auto ref_model = cuda::CudaModel::load(kTiny.string(), runner_like(running, pages));
  ASSERT_TRUE(ref_model.has_value()) << ref_model.status().message();
  const CompressConfig full = make_policy("full");
  std::vector<Reference> refs;
  for (const auto& p : prompts) refs.push_back(run_alone(**ref_model, p, full, n_new));
  auto engine = Engine::create(engine_options(running, pages));
  ASSERT_TRUE(engine.has_value()) << engine.status().message();
  Collector col;
  for (size_t i = 0; i < prompts.size(); ++i)
    ASSERT_TRUE((*engine)->submit(request(prompts[i], full, n_new), col.callback(i)).has_value());
  ASSERT_TRUE(col.wait(prompts.size()));
  const auto outs = col.outcomes();
  int equal = 0, ties = 0;
  for (size_t i = 0; i < prompts.size(); ++i) equal += compare(outs.at(i), refs[i], "full #" + std::to_string(i), &ties);
  const EngineStats st = (*engine)->stats();
  std::printf("  pool of %lld pages: peak running %lld, peak pages %lld, %lld preemptions; %d of %zu outputs equal, "
              "%d diverge at near-ties\n",
              static_cast<long long>(pages), static_cast<long long>(st.peak_running),
              static_cast<long long>(st.peak_kv_pages_used), static_cast<long long>(st.preemptions_total), equal,
              prompts.size(), ties);
  EXPECT_GT(st.preemptions_total, 0) << "the pool was meant to force preemption";
  EXPECT_LE(st.peak_running, 2);
  (*engine)->shutdown(true);
  EXPECT_EQ((*engine)->stats().kv_pages_used, 0) << "pages not returned";
}

// Sampling (temperature > 0) on the device through the engine. The reference is one request alone
// on a CudaModel, as the engine feeds it, with the device drawing from the uniform of a Sampler of
// the request's seed: the engine's tokens must be exactly those. At each reference step the host
// Sampler (same seed, same uniform) on the downloaded logits must pick the device's token, except
// where the uniform lies within 1e-5 of a boundary of the host's cumulative distribution.
TEST(CudaRunner, SampledOutputFollowsTheSeed) {
  SKIP_WITHOUT_DEVICE();
  const int64_t pages = 8192;
  auto ref_model = cuda::CudaModel::load(kTiny.string(), runner_like(8, pages));
  ASSERT_TRUE(ref_model.has_value()) << ref_model.status().message();
  cuda::CudaModel& m = **ref_model;
  auto engine = Engine::create(engine_options(8, pages));
  ASSERT_TRUE(engine.has_value()) << engine.status().message();
  const std::vector<std::vector<int32_t>> prompts = text_prompts({420, 150});
  const int32_t n_new = 32;
  const int64_t vocab = m.config().vocab_size;
  int checked = 0, host_equal = 0, boundary = 0;
  std::vector<std::vector<int32_t>> outputs;
  for (const char* name : {"full", "ada-snapkv"})
    for (size_t i = 0; i < prompts.size(); ++i) {
      SamplingParams sp;
      sp.temperature = i == 0 ? 0.8f : 1.2f;
      sp.top_k = i == 0 ? 0 : 40;
      sp.top_p = i == 0 ? 0.9f : 1.0f;
      sp.seed = 1000 + i;
      const CompressConfig cc = make_policy(name);
      // Reference: prompt chunks, then one sampled token per step.
      Sampler device_draws(sp), host(sp);
      std::vector<int32_t> ref;
      KvCacheManager mgr(m.kv_layout(), m.num_pages());
      const SeqId seq = mgr.add_sequence();
      ASSERT_TRUE(m.set_compression(seq, cc).is_ok());
      cuda::StepResult out;
      cuda::StepSampling ss;
      ss.temperature = sp.temperature;
      ss.top_k = sp.top_k;
      ss.top_p = sp.top_p;
      const std::vector<int32_t>& prompt = prompts[i];
      ss.u = device_draws.next_uniform();  // the first token's draw
      ASSERT_TRUE(step_prompt(m, mgr, seq, prompt, kChunk, true, &ss, &out).is_ok());
      for (;;) {
        const int32_t dev_tok = out.sampled.at(0);
        ASSERT_GE(dev_tok, 0);
        // The host's choice on the same logits with the same uniform.
        const std::span<const float> logits(out.logits.data(), static_cast<size_t>(vocab));
        const std::vector<double> dist = host.distribution(logits);
        const double u = host.next_uniform();
        EXPECT_EQ(u, ss.u);
        double cum = 0.0, gap = 1.0;
        int32_t host_tok = -1;
        for (size_t t = 0; t < dist.size(); ++t) {
          if (dist[t] <= 0.0) continue;
          cum += dist[t];
          gap = std::min(gap, std::abs(cum - u));
          if (host_tok < 0 && u < cum) host_tok = int32_t(t);
        }
        ++checked;
        if (host_tok == dev_tok) {
          ++host_equal;
        } else {
          EXPECT_LT(gap, 1e-5) << name << " prompt " << i << " token " << ref.size() << ": device drew " << dev_tok
                               << ", the host sampler " << host_tok << " with the uniform far from a boundary";
          ++boundary;
        }
        ref.push_back(dev_tok);
        if (int32_t(ref.size()) == n_new) break;
        cuda::SeqStep s;
        s.seq = seq;
        s.tokens = std::span<const int32_t>(&ref.back(), 1);
        ss.u = device_draws.next_uniform();
        s.sampling = &ss;
        ASSERT_TRUE(m.step({&s, 1}, mgr, true, &out).is_ok());
      }
      mgr.release(seq);
      m.on_release(seq);
      // The engine, the same request alone.
      RequestParams rp = request(prompt, cc, n_new);
      rp.sampling = sp;
      Collector col;
      ASSERT_TRUE((*engine)->submit(rp, col.callback(0)).has_value());
      ASSERT_TRUE(col.wait(1));
      const Outcome got = col.outcomes()[0];
      EXPECT_EQ(got.reason, FinishReason::kLength) << got.error;
      EXPECT_EQ(got.tokens, ref) << name << " prompt " << i << ": engine's sampled tokens differ from the reference's";
      outputs.push_back(got.tokens);
    }
  std::printf("  sampled (T 0.8 / top-p 0.9 and T 1.2 / top-k 40): engine == reference for %zu requests; device draw == "
              "host Sampler at %d of %d steps (%d at a boundary within 1e-5)\n",
              outputs.size(), host_equal, checked, boundary);
  (*engine)->shutdown(true);
  EXPECT_EQ((*engine)->stats().kv_pages_used, 0);
}

// A page size the device does not support is refused at creation, naming it. Random weights
// serve through the same engine (tokenizer from models/).
TEST(CudaRunner, RefusalsAndRandomWeights) {
  SKIP_WITHOUT_DEVICE();
  {
    EngineOptions o = engine_options(4, 0);
    o.page_size = 8;
    auto e = Engine::create(o);
    ASSERT_FALSE(e.has_value());
    EXPECT_NE(e.status().message().find("page_size"), std::string::npos) << e.status().message();
  }
  {
    // A small random model with the tiny model's vocabulary: 2 requests through the engine.
    const fs::path dir = fs::temp_directory_path() / "adakv_random_cfg";
    fs::create_directories(dir);
    std::ofstream(dir / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096,
      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": 1, "bos_token_id": 0})";
    EngineOptions o = engine_options(4, 0);
    o.random_weights = (dir / "config.json").string();
    o.gpu_memory_fraction = 0.05;
    auto engine = Engine::create(o);
    ASSERT_TRUE(engine.has_value()) << engine.status().message();
    EXPECT_EQ((*engine)->config().num_layers, 2);
    const std::vector<std::vector<int32_t>> prompts = text_prompts({300, 100});
    Collector col;
    ASSERT_TRUE((*engine)->submit(request(prompts[0], make_policy("ada-snapkv"), 16), col.callback(0)).has_value());
    ASSERT_TRUE((*engine)->submit(request(prompts[1], make_policy("full"), 16), col.callback(1)).has_value());
    ASSERT_TRUE(col.wait(2));
    for (const auto& [i, out] : col.outcomes()) {
      EXPECT_EQ(out.reason, FinishReason::kLength) << out.error;
      EXPECT_EQ(out.tokens.size(), 16u);
    }
    (*engine)->shutdown(true);
  }
}

}  // namespace
}  // namespace adakv

#else  // built without CUDA

TEST(CudaRunner, NeedsCuda) { GTEST_SKIP() << "adakv was built without CUDA: CUDA runner tests skipped"; }

#endif
