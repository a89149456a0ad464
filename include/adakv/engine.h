// The public engine: many concurrent requests over one model and one per-head paged KV pool.
// A scheduler thread runs continuous batching (docs/design.md, "Engine"): every step it admits
// waiting requests by free pages, prefills long prompts in chunks, decodes every running
// sequence one token, compresses each request's cache with its own policy, and when pages run
// out compresses (kvcompress) before it preempts by recompute. Callers never block it: tokens
// come back through a per-request callback, called on the scheduler thread (keep it short: copy
// the event into a queue and return).
//
// This header is the contract between the engine (src/engine) and its front ends (the CLI, the
// HTTP server in src/server). Types are plain data; nothing here needs CUDA.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "compress/compress_config.h"
#include "core/status.h"
#include "engine/sampler.h"

namespace adakv {

class Tokenizer;
struct ModelConfig;

struct EngineOptions {
  std::string model_dir;
  std::string device = "cpu";        // "cpu" | "cuda" | "auto" (cuda when built with CUDA and a
                                     // device is usable); engine/model_runner_factory.h
  int32_t page_size = 16;            // tokens per page of one (sequence, layer, kv head)
  int64_t kv_pages = 0;              // pool size in pages; 0: from kv_memory_bytes
  int64_t kv_memory_bytes = 0;       // K/V bytes for the pool when kv_pages is 0; 0: 1 GiB
                                     // (cuda: 0 means gpu_memory_fraction)
  double gpu_memory_fraction = 0.9;  // cuda: share of the memory left after weights and
                                     // workspace that the KV pool takes, when both above are 0
  std::string random_weights;        // cuda: a config.json whose model is built with random bf16
                                     // weights on the device (benchmarks; no checkpoint);
                                     // model_dir then provides only the tokenizer
  int32_t max_running = 64;          // sequences decoding at once
  int32_t max_step_tokens = 2048;    // tokens per step: decodes + prompt chunks; must be
                                     // >= max_running + prefill_chunk
  int32_t prefill_chunk = 512;       // prompt tokens per prefill step (chunks start at multiples)
  int32_t threads = 0;               // CPU threads of the forward pass; 0: all cores
  CompressConfig default_compress;   // requests that do not say otherwise (policy full = none)
};

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
const char* finish_reason_name(FinishReason r);  // "", "stop", "length", "cancelled", "error"

struct RequestParams {
  std::vector<int32_t> prompt;         // token ids, BOS included when the model wants one
  int64_t max_new_tokens = 128;        // >= 1
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;       // end tokens; empty: the model's (config.json,
                                       // generation_config.json, tokenizer) eos ids
  bool ignore_eos = false;             // true: no end token stops it (stop_ids ignored too)
  CompressConfig compress;             // this request's policy; must pass validate_compress_config
};

// What one request cost and kept; reported with every event, final in the last one.
struct RequestUsage {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  int64_t kv_entries = 0;        // cache entries held now, summed over layers and kv heads
  int64_t kv_full_entries = 0;   // what the full cache would hold
  double compression_ratio() const { return kv_entries > 0 ? static_cast<double>(kv_full_entries) / kv_entries : 1.0; }
  int32_t preemptions = 0;
  double queue_seconds = 0.0;    // submit -> first scheduled
  double first_token_seconds = 0.0;  // submit -> first token
};

struct TokenEvent {
  int32_t token = -1;            // the new token, or -1 on the final event when none came with it
  bool finished = false;         // the last event of this request
  FinishReason reason = FinishReason::kNone;
  Status error;                  // set when reason is kError
  RequestUsage usage;
};

using RequestId = int64_t;
using TokenCallback = std::function<void(const TokenEvent&)>;

struct EngineStats {
  int64_t requests_total = 0;       // submitted and accepted
  int64_t requests_finished = 0;
  int64_t requests_running = 0;
  int64_t requests_waiting = 0;     // queue length
  int64_t prompt_tokens_total = 0;
  int64_t generated_tokens_total = 0;
  int64_t preemptions_total = 0;
  int64_t kv_pages_total = 0;
  int64_t kv_pages_used = 0;
  int64_t kv_entries_kept_total = 0;     // after compression, over finished prefills
  int64_t kv_entries_evicted_total = 0;
  double tokens_per_second = 0.0;   // generated tokens/s over the last few seconds
  int64_t peak_running = 0;
  int64_t peak_kv_pages_used = 0;   // used + reserved by a step, at the start of the step
};

// The checks Engine::create runs on its options before loading anything (front ends may call it
// to refuse bad flags early): every refusal names the option, the value and the allowed range.
Status validate_engine_options(const EngineOptions& options);

class Engine {
 public:
  static Expected<std::unique_ptr<Engine>> create(const EngineOptions& options);
  virtual ~Engine() = default;

  virtual const ModelConfig& config() const = 0;
  virtual const Tokenizer& tokenizer() const = 0;
  virtual int64_t context_length() const = 0;
  virtual const EngineOptions& options() const = 0;

  // Validates synchronously and queues: an empty prompt, prompt + max_new_tokens over the
  // context, a prompt that could never fit the pool, bad sampling or compression parameters
  // are errors naming the problem (the server answers 400). Afterwards every outcome, including
  // failures, arrives through on_event, ending with one event whose `finished` is true.
  virtual Expected<RequestId> submit(RequestParams params, TokenCallback on_event) = 0;
  // Stops a request and frees its pages; its final event has reason kCancelled. Unknown or
  // finished ids are ignored.
  virtual void cancel(RequestId id) = 0;
  virtual EngineStats stats() const = 0;
  // Stops accepting (submit fails), then finishes in-flight requests when `drain`, else cancels
  // them; returns when the scheduler thread has stopped. Idempotent; the destructor calls it.
  virtual void shutdown(bool drain) = 0;
};

}  // namespace adakv
