// Single-sequence generation on the CPU: prefill the prompt, then sample and feed back one token
// at a time over a per-head paged KV cache sized for the request; stops at an end token or after
// max_new_tokens. The multi-request scheduler of the server will replace the loop, not the model.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "compress/compress_config.h"
#include "compress/kv_compressor.h"
#include "core/status.h"
#include "engine/compression_observer.h"
#include "engine/sampler.h"
#include "model/layer_observer.h"
#include "model/transformer.h"

namespace adakv {

// Sampling defaults of a checkpoint, as transformers would use them: from
// DIR/generation_config.json when present (do_sample false or absent -> greedy; with sampling,
// temperature/top_k/top_p from the file, else transformers' defaults 1.0 / 50 / 1.0). A missing
// file gives greedy defaults (top_k 50, top_p 1 for when a temperature is set later); a
// malformed one is an error naming the file.
Expected<SamplingParams> load_sampling_defaults(const std::string& model_dir);

// Where GenerateOptions::kv_tap is called.
enum class KvTapPoint {
  kAfterPrefill,  // after the prefill, its compression and any appended prompt; before decoding
  kEnd,           // after the last decode step, before the sequence is released
};

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplingParams sampling;
  bool ignore_eos = false;
  std::vector<int32_t> eos_ids;  // any of them ends generation (unless ignore_eos)
  int32_t page_size = 16;
  LayerObserver* observer = nullptr;  // passed to every forward step (after the compressor)
  // KV-cache compression (null or policy full: the full cache). Must pass validate_compress_config.
  const CompressConfig* compress = nullptr;
  // Question-agnostic use: when not empty, these tokens are prefilled first (and compressed), then
  // the prompt is appended to the compressed cache in one multi-token step, then generation.
  std::span<const int32_t> context;
  // Optional: sees the sequence's cache at the points of KvTapPoint (tests compare caches with it).
  std::function<void(KvTapPoint, const KvCacheManager&, const CpuKvStorage&, SeqId)> kv_tap;
};

struct GenerateStats {
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0.0;  // prompt forward + first token
  int64_t generated_tokens = 0;
  int64_t decode_steps = 0;      // single-token forward passes after the prefill
  double decode_seconds = 0.0;
  int64_t context_tokens = 0;
  KvCacheStats kv;               // the cache at the end (before release)
  KvCacheStats kv_after_prefill; // after the prefill (and the prompt append)
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids; the end token that stopped it is not included
  bool stopped_at_eos = false;
  GenerateStats stats;
};

// Whether a request fits the model's context (prompt_tokens, max_new_tokens >= 0): prompt_tokens +
// max_new_tokens <= context_length,
// else out_of_range naming all three ("prompt of N tokens + M new tokens exceeds the model's
// context of C"). Every path that generates (CPU and CUDA generate, the engine, eval) checks this
// before any work, so each refuses a request with the same error.
Status check_fits_context(int64_t prompt_tokens, int64_t max_new_tokens, int64_t context_length);

// Whether `id` ends a generation under `options`: one of eos_ids, unless ignore_eos.
bool is_eos_token(const GenerateOptions& options, int32_t id);

// The decode loop that generate() shares with cuda::generate(): emits `next` (into result->tokens
// and to on_token, which may be empty) and asks step(next) for the token after it, until an EOS
// id (result->stopped_at_eos; not emitted), max_new_tokens emitted, or an error from `step`.
// step(token) runs one decode step on the token just emitted and returns the next one; it may
// read result->stats.decode_steps, which counts the steps finished before it. Times the loop into
// result->stats.decode_seconds.
Status run_decode_loop(int32_t next, const GenerateOptions& options, const std::function<void(int32_t)>& on_token,
                       const std::function<Expected<int32_t>(int32_t)>& step, GenerateResult* result);

// With options.context, the prompt may be empty (generation continues the context).
// `on_token` (may be empty) is called with every generated id as soon as it is chosen, except
// an end token that stops generation. Errors: empty prompt, prompt + max_new_tokens beyond the
// model's context ("prompt of N tokens + M new tokens exceeds the model's context of C"),
// invalid sampling parameters.
Expected<GenerateResult> generate(const Transformer& model, std::span<const int32_t> prompt,
                                  const GenerateOptions& options, const std::function<void(int32_t)>& on_token);

// A sequence whose prefill already ran elsewhere (engine/prefill_snapshot.h): its cache holds the
// prefilled tokens (logical length advanced) and, when compressing, `compressor` has run every
// prefill hook (after_prefill_layer per layer, then after_prefill) on it.
struct PrefilledSequence {
  KvCacheManager* manager = nullptr;
  CpuKvStorage* storage = nullptr;
  SeqId seq = -1;
  KvCompressor* compressor = nullptr;  // null: the full cache
  std::span<const float> logits;       // [vocab] the prefill's last-position logits
};

// Continues `prefilled` exactly as generate() continues after its own prefill: `append` (may be
// empty) goes onto the cache in one multi-token step (as the prompt after GenerateOptions::context
// does), the first token is sampled from that step's logits (or from prefilled.logits when
// `append` is empty), then decoding with the compressor's decode hooks. Uses max_new_tokens,
// sampling, ignore_eos, eos_ids, observer and kv_tap of `options` (compress, context and
// page_size belong to the prefill). The sequence is released at the end (stats.kv is taken
// before). Errors: the context would be exceeded, invalid sampling parameters.
Expected<GenerateResult> continue_generation(const Transformer& model, const PrefilledSequence& prefilled,
                                             std::span<const int32_t> append, const GenerateOptions& options,
                                             const std::function<void(int32_t)>& on_token);

}  // namespace adakv
