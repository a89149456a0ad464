#include "engine/generator.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "compress/kv_compressor.h"
#include "core/mapped_file.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"

namespace adakv {

Expected<SamplingParams> load_sampling_defaults(const std::string& model_dir) {
  SamplingParams p;  // greedy; transformers' top_k default for when a temperature is given
  p.top_k = 50;
  const std::string path = model_dir + "/generation_config.json";
  if (!std::filesystem::exists(path)) return p;
  ADAKV_ASSIGN_OR_RETURN(std::string text, read_text_file(path));
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return data_loss(path + ": not a JSON object");
  auto number = [&](const char* key, double fallback) -> Expected<double> {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    if (!j[key].is_number()) return data_loss(path + ": '" + key + "' is not a number");
    return j[key].get<double>();
  };
  bool do_sample = false;
  if (j.contains("do_sample") && !j["do_sample"].is_null()) {
    if (!j["do_sample"].is_boolean()) return data_loss(path + ": 'do_sample' is not a boolean");
    do_sample = j["do_sample"].get<bool>();
  }
  ADAKV_ASSIGN_OR_RETURN(double temperature, number("temperature", 1.0));
  ADAKV_ASSIGN_OR_RETURN(double top_k, number("top_k", 50.0));
  ADAKV_ASSIGN_OR_RETURN(double top_p, number("top_p", 1.0));
  p.temperature = do_sample ? static_cast<float>(temperature) : 0.0f;
  p.top_k = static_cast<int32_t>(top_k);
  p.top_p = static_cast<float>(top_p);
  Status valid = validate_sampling(p);
  if (!valid.is_ok()) return valid.with_context(path);
  return p;
}

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

Status check_fits_context(int64_t prompt_tokens, int64_t max_new_tokens, int64_t context_length) {
  // Compared so that a huge max_new_tokens (a request's max_tokens) cannot overflow the sum.
  if (max_new_tokens <= context_length && prompt_tokens <= context_length - max_new_tokens) return Status::ok();
  return out_of_range("prompt of " + std::to_string(prompt_tokens) + " tokens + " + std::to_string(max_new_tokens) +
                      " new tokens exceeds the model's context of " + std::to_string(context_length));
}

bool is_eos_token(const GenerateOptions& options, int32_t id) {
  return !options.ignore_eos && std::find(options.eos_ids.begin(), options.eos_ids.end(), id) != options.eos_ids.end();
}

Status run_decode_loop(int32_t next, const GenerateOptions& options, const std::function<void(int32_t)>& on_token,
                       const std::function<Expected<int32_t>(int32_t)>& step, GenerateResult* result) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    if (is_eos_token(options, next)) {
      result->stopped_at_eos = true;
      break;
    }
    result->tokens.push_back(next);
    if (on_token) on_token(next);
    if (static_cast<int64_t>(result->tokens.size()) >= options.max_new_tokens) break;
    ADAKV_ASSIGN_OR_RETURN(next, step(next));
    ++result->stats.decode_steps;
  }
  result->stats.decode_seconds = seconds_since(start);
  return Status::ok();
}

namespace {

// One forward step of the given phase, bracketed for the compressor (when there is one).
Status forward_step(const Transformer& model, const KvContext& kv, const ForwardOptions& fwd,
                    CompressionObserver* comp_obs, std::span<const int32_t> toks, CompressionObserver::Phase phase,
                    std::vector<float>* logits) {
  if (comp_obs != nullptr) comp_obs->begin_step(phase, static_cast<int64_t>(toks.size()));
  ADAKV_RETURN_IF_ERROR(model.forward(toks, kv, fwd, logits));
  return comp_obs != nullptr ? comp_obs->end_step() : Status::ok();
}

// Everything after the prefill, shared by generate() and continue_generation(): the appended
// tokens (one kAppend step), the first token from the last logits, the decode loop, release.
// `logits` holds the prefill's last-position logits; `start` is when the prefill began.
Expected<GenerateResult> finish_generation(const Transformer& model, const KvContext& kv, KvCompressor* compressor,
                                           CompressionObserver* comp_obs, const ForwardOptions& fwd,
                                           std::vector<float>& logits, std::span<const int32_t> append,
                                           const GenerateOptions& options,
                                           const std::function<void(int32_t)>& on_token, GenerateResult result,
                                           std::chrono::steady_clock::time_point start) {
  KvCacheManager& manager = *kv.manager;
  const SeqId seq = kv.seq;
  Sampler sampler(options.sampling);
  // The prompt goes onto the compressed context as one multi-token step: the forward's causal
  // rule by token position gives the bottom-right aligned mask over the kept entries.
  if (!append.empty()) {
    ADAKV_RETURN_IF_ERROR(
        forward_step(model, kv, fwd, comp_obs, append, CompressionObserver::Phase::kAppend, &logits));
  }
  result.stats.kv_after_prefill = kv_cache_stats(manager, seq);
  if (options.kv_tap) options.kv_tap(KvTapPoint::kAfterPrefill, manager, *kv.storage, seq);
  int32_t next = sampler.sample(logits);
  result.stats.prefill_seconds = seconds_since(start);

  auto decode_step = [&](int32_t token) -> Expected<int32_t> {
    ADAKV_RETURN_IF_ERROR(forward_step(model, kv, fwd, comp_obs, std::span<const int32_t>(&token, 1),
                                       CompressionObserver::Phase::kDecode, &logits));
    return sampler.sample(logits);
  };
  ADAKV_RETURN_IF_ERROR(run_decode_loop(next, options, on_token, decode_step, &result));
  result.stats.generated_tokens = static_cast<int64_t>(result.tokens.size());
  result.stats.kv = kv_cache_stats(manager, seq);
  if (options.kv_tap) options.kv_tap(KvTapPoint::kEnd, manager, *kv.storage, seq);
  if (compressor != nullptr) compressor->on_release(seq);
  manager.release(seq);
  return result;
}

}  // namespace

Expected<GenerateResult> generate(const Transformer& model, std::span<const int32_t> prompt,
                                  const GenerateOptions& options, const std::function<void(int32_t)>& on_token) {
  ADAKV_RETURN_IF_ERROR(validate_sampling(options.sampling));
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  const int64_t n_context = static_cast<int64_t>(options.context.size());
  if (n_prompt + n_context == 0) return invalid_argument("the prompt is empty (no tokens)");
  if (options.max_new_tokens < 0) return invalid_argument("the number of new tokens must be >= 0");
  ADAKV_RETURN_IF_ERROR(check_fits_context(n_context + n_prompt, options.max_new_tokens, model.context_length()));
  if (options.page_size <= 0) return invalid_argument("the KV page size must be > 0");

  // A pool that holds the whole request in every row, so the request can never be refused.
  const KvLayout layout = model.kv_layout(options.page_size);
  const int64_t tokens = n_context + n_prompt + options.max_new_tokens;
  const int64_t pages_per_row = (tokens + options.page_size - 1) / options.page_size;
  const int64_t num_pages = pages_per_row * layout.num_layers * layout.num_kv_heads;
  KvCacheManager manager(layout, num_pages);
  CpuKvStorage storage(layout, num_pages);
  const SeqId seq = manager.add_sequence();
  const KvContext kv{&manager, &storage, seq};
  std::vector<float> logits;  // [vocab]
  ForwardOptions fwd;
  fwd.observer = options.observer;

  // Compression: a KvCompressor driven from inside the forward by a CompressionObserver, which
  // forwards every call to the caller's observer.
  std::unique_ptr<KvCompressor> compressor;
  std::unique_ptr<CompressionObserver> comp_obs;
  std::vector<std::vector<float>> o_proj;  // [layers][hidden][q_dim], two-stage policies only
  if (options.compress != nullptr && policy_compresses(options.compress->policy)) {
    ADAKV_RETURN_IF_ERROR(validate_compress_config(*options.compress));
    if (policy_is_two_stage(options.compress->policy)) {
      ADAKV_ASSIGN_OR_RETURN(o_proj, load_o_proj(model.dir(), model.config()));
    }
    compressor = std::make_unique<KvCompressor>(*options.compress, layout, static_cast<int32_t>(model.config().num_heads),
                                                storage.num_slots());
    comp_obs = std::make_unique<CompressionObserver>(*compressor, model.config(), manager, storage, seq, &o_proj,
                                                     options.observer);
    fwd.observer = comp_obs.get();
  }

  GenerateResult result;
  result.stats.prompt_tokens = n_prompt;
  result.stats.context_tokens = n_context;
  if (options.max_new_tokens == 0) return result;

  const auto start = std::chrono::steady_clock::now();
  std::span<const int32_t> append;
  if (n_context > 0) {
    ADAKV_RETURN_IF_ERROR(forward_step(model, kv, fwd, comp_obs.get(), options.context,
                                       CompressionObserver::Phase::kPrefill, &logits));
    append = prompt;
  } else {
    ADAKV_RETURN_IF_ERROR(
        forward_step(model, kv, fwd, comp_obs.get(), prompt, CompressionObserver::Phase::kPrefill, &logits));
  }
  return finish_generation(model, kv, compressor.get(), comp_obs.get(), fwd, logits, append, options, on_token,
                           std::move(result), start);
}

Expected<GenerateResult> continue_generation(const Transformer& model, const PrefilledSequence& prefilled,
                                             std::span<const int32_t> append, const GenerateOptions& options,
                                             const std::function<void(int32_t)>& on_token) {
  ADAKV_RETURN_IF_ERROR(validate_sampling(options.sampling));
  if (prefilled.manager == nullptr || prefilled.storage == nullptr) {
    return invalid_argument("continue_generation: no cache");
  }
  if (options.max_new_tokens < 0) return invalid_argument("the number of new tokens must be >= 0");
  KvCacheManager& manager = *prefilled.manager;
  const int64_t n_prefilled = manager.logical_length(prefilled.seq);
  const int64_t n_append = static_cast<int64_t>(append.size());
  ADAKV_RETURN_IF_ERROR(check_fits_context(n_prefilled + n_append, options.max_new_tokens, model.context_length()));
  if (append.empty() && prefilled.logits.empty()) {
    return invalid_argument("continue_generation: no logits to sample the first token from");
  }
  const KvContext kv{prefilled.manager, prefilled.storage, prefilled.seq};
  ForwardOptions fwd;
  fwd.observer = options.observer;
  std::unique_ptr<CompressionObserver> comp_obs;
  if (prefilled.compressor != nullptr) {
    // Only kAppend and kDecode steps run here, which never need o_proj.
    comp_obs = std::make_unique<CompressionObserver>(*prefilled.compressor, model.config(), manager, *prefilled.storage,
                                                     prefilled.seq, nullptr, options.observer);
    fwd.observer = comp_obs.get();
  }
  GenerateResult result;
  result.stats.prompt_tokens = n_append;
  result.stats.context_tokens = n_prefilled;
  if (options.max_new_tokens == 0) return result;
  std::vector<float> logits(prefilled.logits.begin(), prefilled.logits.end());
  return finish_generation(model, kv, prefilled.compressor, comp_obs.get(), fwd, logits, append, options, on_token,
                           std::move(result), std::chrono::steady_clock::now());
}

}  // namespace adakv
