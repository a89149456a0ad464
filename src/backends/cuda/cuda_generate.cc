// cuda::generate (cuda_generate.h).
#include "backends/cuda/cuda_generate.h"

#include <chrono>
#include <random>

#include "engine/compression_observer.h"
#include "kv/kv_cache_manager.h"

namespace adakv::cuda {
namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

Expected<GenerateResult> generate(CudaModel& model, std::span<const int32_t> prompt, const GenerateOptions& options,
                                  const std::function<void(int32_t)>& on_token) {
  ADAKV_RETURN_IF_ERROR(validate_sampling(options.sampling));
  if (options.observer != nullptr) return unimplemented("cuda generate: layer observers need the CPU forward");
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  const int64_t n_context = static_cast<int64_t>(options.context.size());
  if (n_prompt + n_context == 0) return invalid_argument("the prompt is empty (no tokens)");
  if (options.max_new_tokens < 0) return invalid_argument("the number of new tokens must be >= 0");
  ADAKV_RETURN_IF_ERROR(check_fits_context(n_context + n_prompt, options.max_new_tokens, model.context_length()));
  const bool compressing = options.compress != nullptr && policy_compresses(options.compress->policy);
  if (compressing) ADAKV_RETURN_IF_ERROR(validate_compress_config(*options.compress));

  KvCacheManager manager(model.kv_layout(), model.num_pages());
  const SeqId seq = manager.add_sequence();
  GenerateResult result;
  result.stats.prompt_tokens = n_prompt;
  result.stats.context_tokens = n_context;
  if (options.max_new_tokens == 0) return result;

  // The draw's uniform comes from the same generator the CPU Sampler uses, in the same order.
  std::mt19937_64 rng(options.sampling.seed);
  StepSampling sampling;
  sampling.temperature = options.sampling.temperature;
  sampling.top_k = options.sampling.top_k;
  sampling.top_p = options.sampling.top_p;
  auto next_uniform = [&] {
    sampling.u = sampling.temperature > 0.f ? static_cast<double>(rng() >> 11) * 0x1.0p-53 : 0.0;
  };
  StepResult out;
  auto run = [&](std::span<const int32_t> toks, bool compress, bool sample) -> Status {
    SeqStep s;
    s.seq = seq;
    s.tokens = toks;
    s.compress = compress;
    if (sample) {
      next_uniform();
      s.sampling = &sampling;
    }
    return model.step(std::span<const SeqStep>(&s, 1), manager, false, &out);
  };

  auto start = std::chrono::steady_clock::now();
  if (n_context > 0) {
    ADAKV_RETURN_IF_ERROR(run(options.context, compressing, n_prompt == 0));
    if (n_prompt > 0) ADAKV_RETURN_IF_ERROR(run(prompt, false, true));
  } else {
    ADAKV_RETURN_IF_ERROR(run(prompt, compressing, true));
  }
  result.stats.kv_after_prefill = kv_cache_stats(manager, seq);
  int32_t next = out.sampled[0];
  result.stats.prefill_seconds = seconds_since(start);

  const bool continual = compressing && policy_is_continual(options.compress->policy);
  auto decode_step = [&](int32_t token) -> Expected<int32_t> {
    ADAKV_RETURN_IF_ERROR(run(std::span<const int32_t>(&token, 1), false, true));
    // Continual policies compress after every `interval` decode steps (this one included).
    if (continual && (result.stats.decode_steps + 1) % options.compress->interval == 0)
      ADAKV_RETURN_IF_ERROR(model.compress_now(seq, manager));
    return out.sampled[0];
  };
  ADAKV_RETURN_IF_ERROR(run_decode_loop(next, options, on_token, decode_step, &result));
  result.stats.generated_tokens = static_cast<int64_t>(result.tokens.size());
  result.stats.kv = kv_cache_stats(manager, seq);
  manager.release(seq);
  model.on_release(seq);
  return result;
}

}  // namespace adakv::cuda
