// adakv generate: streams a completion of --prompt to stdout, token by token, and prints load
// time, prompt / decode speed and the KV cache's size to stderr at the end. With --kv-policy the
// cache is compressed (compress/kv_compressor.h); with --context FILE the file is prefilled and
// compressed first and --prompt is appended to the compressed cache (question-agnostic use).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "cli/kv_flags.h"
#include "core/mapped_file.h"
#include "engine/generator.h"
#include "engine/model_runner_factory.h"
#include "io/tokenizer.h"
#include "model/transformer.h"
#if ADAKV_HAVE_CUDA
#include "backends/cuda/cuda_generate.h"
#endif

namespace adakv::cli {
namespace {

struct GenerateArgs {
  std::string model_dir;
  std::string prompt;
  std::string context_file;
  KvFlags kv;
  int64_t max_new_tokens = 128;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;
  uint64_t seed = 0;
  bool ignore_eos = false;
  std::string device = "auto";
  double gpu_memory_fraction = 0.9;
  CLI::Option* temperature_opt = nullptr;
  CLI::Option* top_p_opt = nullptr;
  CLI::Option* top_k_opt = nullptr;
};

void run_generate(const GenerateArgs& args) {
  const CompressConfig compress = kv_config_or_fail(args.kv);
  if (!std::filesystem::is_directory(args.model_dir)) {
    fail(not_found(args.model_dir + ": no such model directory"));
  }
  // --device: cuda when asked, or (auto) when this build has CUDA and a device is present.
  bool use_cuda = args.device == "cuda";
#if ADAKV_HAVE_CUDA
  if (args.device == "auto") use_cuda = cuda::cuda_device_available().is_ok();
  if (use_cuda) {
    const Status dev = cuda::cuda_device_available();
    if (!dev.is_ok()) fail(dev.with_context("--device cuda"));
  }
#else
  if (use_cuda) fail(unimplemented("--device cuda: this adakv was built without CUDA"));
#endif
  const auto load_start = std::chrono::steady_clock::now();
  std::unique_ptr<Transformer> model;
  const ModelConfig* config = nullptr;
#if ADAKV_HAVE_CUDA
  std::unique_ptr<cuda::CudaModel> cuda_model;
  if (use_cuda) {
    cuda::CudaModelOptions co;
    co.max_seqs = 1;
    // One step takes the whole prompt (or context): the workspace is sized for it, up to 32K.
    const ModelConfig mc = value_or_fail(load_model_config(args.model_dir));
    co.max_step_tokens = static_cast<int32_t>(std::min<int64_t>(mc.max_position_embeddings, 32768));
    co.gpu_memory_fraction = args.gpu_memory_fraction;
    co.compress = &compress;
    cuda_model = value_or_fail(cuda::CudaModel::load(args.model_dir, co));
    config = &cuda_model->config();
  }
#endif
  if (!use_cuda) {
    model = value_or_fail(Transformer::load(args.model_dir));
    config = &model->config();
  }
  std::shared_ptr<Tokenizer> tokenizer = value_or_fail(Tokenizer::load(args.model_dir));
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();

  GenerateOptions options;
  options.max_new_tokens = args.max_new_tokens;
  options.ignore_eos = args.ignore_eos;
  options.sampling = value_or_fail(load_sampling_defaults(args.model_dir));
  if (args.temperature_opt->count() > 0) options.sampling.temperature = args.temperature;
  if (args.top_p_opt->count() > 0) options.sampling.top_p = args.top_p;
  if (args.top_k_opt->count() > 0) options.sampling.top_k = args.top_k;
  options.sampling.seed = args.seed;
  options.eos_ids = config->eos_token_ids;
  for (int32_t id : tokenizer->eos_ids()) options.eos_ids.push_back(id);

  options.compress = &compress;
  std::vector<int32_t> context;
  if (!args.context_file.empty()) {
    const std::string text = value_or_fail(read_text_file(args.context_file));
    context = tokenizer->encode(text, /*add_special=*/true);
    options.context = context;
  }
  // After a context, the prompt continues the same sequence: no second BOS.
  const std::vector<int32_t> prompt = tokenizer->encode(args.prompt, /*add_special=*/context.empty());
  StreamDecoder decoder(tokenizer, /*skip_special=*/true);
  auto on_token = [&](int32_t id) {
    const std::string text = decoder.push(id);
    if (!text.empty()) std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  };
  GenerateResult result;
#if ADAKV_HAVE_CUDA
  if (use_cuda) {
    result = value_or_fail(cuda::generate(*cuda_model, prompt, options, on_token));
  }
#endif
  if (!use_cuda) result = value_or_fail(generate(*model, prompt, options, on_token));
  const std::string rest = decoder.finish();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);

  const GenerateStats& s = result.stats;
  std::fprintf(stderr, "adakv: loaded %s in %.3f s (device %s)\n", args.model_dir.c_str(), load_seconds,
               device_label(use_cuda ? "cuda" : "cpu").c_str());
  if (s.context_tokens > 0) std::fprintf(stderr, "adakv: context: %lld tokens\n", static_cast<long long>(s.context_tokens));
  std::fprintf(stderr, "adakv: prompt: %lld tokens in %.3f s (%.1f tokens/s)\n", static_cast<long long>(s.prompt_tokens),
               s.prefill_seconds,  // the prefill covers the context too
               s.prefill_seconds > 0 ? (s.context_tokens + s.prompt_tokens) / s.prefill_seconds : 0.0);
  std::fprintf(stderr, "adakv: generated: %lld tokens%s; decode %lld steps in %.3f s (%.1f tokens/s)\n",
               static_cast<long long>(s.generated_tokens), result.stopped_at_eos ? " (stopped at end token)" : "",
               static_cast<long long>(s.decode_steps), s.decode_seconds,
               s.decode_seconds > 0 ? s.decode_steps / s.decode_seconds : 0.0);
  auto print_kv = [](const char* when, const KvCacheStats& k) {
    std::fprintf(stderr, "adakv: kv %s: %lld / %lld entries kept, %lld / %lld pages used, compression %.2fx\n", when,
                 static_cast<long long>(k.entries), static_cast<long long>(k.full_entries),
                 static_cast<long long>(k.pages_used), static_cast<long long>(k.full_pages), k.compression_ratio());
  };
  std::fprintf(stderr, "adakv: kv policy: %s\n", kv_policy_name(compress.policy));
  print_kv("after prefill", s.kv_after_prefill);
  print_kv("at end", s.kv);
}

}  // namespace

void register_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate a completion of a prompt, streamed to stdout");
  cmd->add_option("--model", args->model_dir, "Hugging Face checkpoint folder")->required();
  cmd->add_option("--prompt", args->prompt, "Prompt text (after --context: the question)");
  cmd->add_option("--context", args->context_file, "Text file prefilled and compressed before the prompt")
      ->check(CLI::ExistingFile);
  cmd->add_option("-n,--max-new-tokens", args->max_new_tokens, "Most tokens to generate")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  args->temperature_opt = cmd->add_option("--temperature", args->temperature,
                                          "0 = greedy (default: generation_config.json, greedy when it does not sample)");
  args->top_p_opt = cmd->add_option("--top-p", args->top_p, "Nucleus sampling mass in (0, 1]; 1 = off (default: generation_config.json, else 1)");
  args->top_k_opt = cmd->add_option("--top-k", args->top_k, "Keep the k most likely tokens; 0 = off (default: generation_config.json, else 50 as transformers)");
  cmd->add_option("--seed", args->seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Do not stop at end tokens");
  cmd->add_option("--device", args->device, "cpu | cuda | auto (cuda when a CUDA device is present)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cmd->add_option("--gpu-memory-fraction", args->gpu_memory_fraction,
                  "Share of the device memory left after weights and workspace that the KV pool takes")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 1.0));
  add_kv_flags(cmd, args->kv);
  cmd->callback([args] {
    if (args->prompt.empty() && args->context_file.empty()) fail(invalid_argument("--prompt or --context is required"));
    run_generate(*args);
  });
}

}  // namespace adakv::cli
