// adakv bench serve: the engine in-process under N concurrent requests of fixed prompt and
// output lengths (prompts cut from held-out text, or random tokens), with a KV memory limit
// and any compression policy; prints throughput, latency and time-to-first-token percentiles,
// peak concurrency and KV pages, and preemptions. All requests are submitted at once (a
// closed batch): the numbers say how many sequences the pool lets run together.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "adakv/engine.h"
#include "cli/commands.h"
#include "cli/kv_flags.h"
#include "core/mapped_file.h"
#include "engine/scheduler.h"
#include "io/tokenizer.h"
#include "model/model_config.h"

namespace adakv::cli {
namespace {

struct BenchServeArgs {
  std::string model_dir;
  std::string device = "auto";
  std::string random_weights;
  double gpu_memory_fraction = 0.9;
  int64_t requests = 32;
  int64_t prompt_tokens = 512;
  int64_t output_tokens = 128;
  std::string prompts = "haystack";
  std::string haystack = "data/haystack/validation.txt";
  uint64_t kv_memory = 0;  // bytes
  int64_t kv_pages = 0;
  int64_t page_size = 16;
  int64_t max_running = 64;
  int64_t prefill_chunk = 512;
  int64_t max_step_tokens = 0;
  bool stop_at_eos = false;
  uint64_t seed = 1;
  KvFlags kv;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  // Nearest rank: the smallest value with at least p% of the samples at or below it.
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

std::vector<std::vector<int32_t>> make_prompts(const BenchServeArgs& a, const Engine& engine) {
  const Tokenizer& tok = engine.tokenizer();
  const int64_t vocab = engine.config().vocab_size;
  std::vector<std::vector<int32_t>> out;
  const int32_t bos = tok.bos_id();
  const int64_t body = a.prompt_tokens - (bos >= 0 ? 1 : 0);
  if (a.prompts == "random") {
    uint64_t x = a.seed * 0x9E3779B97F4A7C15ull + 1;
    for (int64_t r = 0; r < a.requests; ++r) {
      std::vector<int32_t> p;
      if (bos >= 0) p.push_back(bos);
      while (static_cast<int64_t>(p.size()) < a.prompt_tokens) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        p.push_back(static_cast<int32_t>(x % static_cast<uint64_t>(vocab)));
      }
      out.push_back(std::move(p));
    }
    return out;
  }
  if (a.prompts != "haystack") fail(invalid_argument("--prompts '" + a.prompts + "': allowed haystack | random"));
  if (!std::filesystem::exists(a.haystack)) fail(not_found(a.haystack + ": no such file (--haystack)"));
  const std::string text = value_or_fail(read_text_file(a.haystack));
  // Each request reads its own stretch of the text; tokenize only what is needed (~6 bytes a
  // token is ample for English BPE), wrapping around when the file is short.
  const size_t want = std::min(text.size(), static_cast<size_t>(a.requests * body * 6 + 4096));
  const std::vector<int32_t> ids = tok.encode(std::string_view(text).substr(0, want), /*add_special=*/false);
  if (ids.empty()) fail(invalid_argument(a.haystack + ": no tokens"));
  for (int64_t r = 0; r < a.requests; ++r) {
    std::vector<int32_t> p;
    if (bos >= 0) p.push_back(bos);
    const size_t start = static_cast<size_t>(r * body) % ids.size();
    for (int64_t i = 0; i < body; ++i) p.push_back(ids[(start + static_cast<size_t>(i)) % ids.size()]);
    out.push_back(std::move(p));
  }
  return out;
}

void run_bench_serve(const BenchServeArgs& a) {
  const CompressConfig compress = kv_config_or_fail(a.kv);
  if (a.requests < 1) fail(invalid_argument("--requests must be >= 1"));
  if (a.prompt_tokens < 1) fail(invalid_argument("--prompt-tokens must be >= 1"));
  if (a.output_tokens < 1) fail(invalid_argument("--output-tokens must be >= 1"));
  EngineOptions o;
  o.model_dir = a.model_dir;
  o.device = a.device;
  o.gpu_memory_fraction = a.gpu_memory_fraction;
  o.random_weights = a.random_weights;
  o.page_size = static_cast<int32_t>(a.page_size);
  o.kv_pages = a.kv_pages;
  o.kv_memory_bytes = static_cast<int64_t>(a.kv_memory);
  o.max_running = static_cast<int32_t>(a.max_running);
  o.prefill_chunk = static_cast<int32_t>(a.prefill_chunk);
  o.max_step_tokens = static_cast<int32_t>(a.max_step_tokens > 0 ? a.max_step_tokens : a.max_running + a.prefill_chunk);
  o.default_compress = compress;
  const auto load_start = std::chrono::steady_clock::now();
  std::unique_ptr<Engine> engine = value_or_fail(Engine::create(o));
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
  const std::vector<std::vector<int32_t>> prompts = make_prompts(a, *engine);

  const EngineStats s0 = engine->stats();
  const ModelConfig& mc = engine->config();
  KvLayout layout;
  layout.num_layers = static_cast<int32_t>(mc.num_layers);
  layout.num_kv_heads = static_cast<int32_t>(mc.num_kv_heads);
  layout.head_dim = static_cast<int32_t>(mc.head_dim);
  layout.page_size = o.page_size;
  const int64_t full_request_pages = kv_pages_for_tokens(layout, a.prompt_tokens + a.output_tokens);
  std::printf("adakv bench serve: %s, policy %s", a.model_dir.c_str(), kv_policy_name(compress.policy));
  if (policy_compresses(compress.policy)) std::printf(" (budget %d, window %d)", compress.budget, compress.window);
  std::printf(", %lld requests x (%lld prompt + %lld new) tokens, prompts: %s\n", static_cast<long long>(a.requests),
              static_cast<long long>(a.prompt_tokens), static_cast<long long>(a.output_tokens), a.prompts.c_str());
  std::printf("device %s; kv pool: %lld pages of %d tokens; one request's full cache: %lld pages (pool fits %.1f)\n",
              engine->options().device.c_str(), static_cast<long long>(s0.kv_pages_total), o.page_size,
              static_cast<long long>(full_request_pages),
              static_cast<double>(s0.kv_pages_total) / static_cast<double>(full_request_pages));
  std::fflush(stdout);

  struct Record {
    double latency = 0.0;
    double ttft = 0.0;
    int64_t generated = 0;
    int64_t kv_entries = 0, kv_full = 0;
    int32_t preemptions = 0;
    FinishReason reason = FinishReason::kNone;
    std::string error;
  };
  std::vector<Record> records(static_cast<size_t>(a.requests));
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < a.requests; ++r) {
    RequestParams p;
    p.prompt = prompts[static_cast<size_t>(r)];
    p.max_new_tokens = a.output_tokens;
    p.ignore_eos = !a.stop_at_eos;
    p.compress = compress;
    auto on_event = [&, r](const TokenEvent& e) {
      if (!e.finished) return;
      std::lock_guard<std::mutex> lock(mu);
      Record& rec = records[static_cast<size_t>(r)];
      rec.latency = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      rec.ttft = e.usage.first_token_seconds;
      rec.generated = e.usage.generated_tokens;
      rec.kv_entries = e.usage.kv_entries;
      rec.kv_full = e.usage.kv_full_entries;
      rec.preemptions = e.usage.preemptions;
      rec.reason = e.reason;
      rec.error = e.error.message();
      ++done;
      cv.notify_all();
    };
    value_or_fail(engine->submit(std::move(p), on_event));
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done == a.requests; });
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const EngineStats st = engine->stats();
  engine->shutdown(/*drain=*/true);

  std::vector<double> latency, ttft;
  int64_t generated = 0, failed = 0, kv_kept = 0, kv_full = 0;
  for (const Record& r : records) {
    latency.push_back(r.latency);
    ttft.push_back(r.ttft);
    generated += r.generated;
    kv_kept += r.kv_entries;
    kv_full += r.kv_full;
    if (r.reason == FinishReason::kError) {
      ++failed;
      std::fprintf(stderr, "adakv: request failed: %s\n", r.error.c_str());
    }
  }
  const int64_t prompt_total = a.requests * a.prompt_tokens;
  std::printf("wall %.2f s (load %.2f s); generated %lld tokens: %.1f tok/s; total (prompt + generated) %.1f tok/s\n",
              wall, load_seconds, static_cast<long long>(generated), generated / wall, (prompt_total + generated) / wall);
  std::printf("latency p50 %.2f s, p99 %.2f s; time to first token p50 %.2f s, p99 %.2f s\n", percentile(latency, 50),
              percentile(latency, 99), percentile(ttft, 50), percentile(ttft, 99));
  std::printf("peak running %lld, peak kv pages %lld / %lld, preemptions %lld, failed %lld\n",
              static_cast<long long>(st.peak_running), static_cast<long long>(st.peak_kv_pages_used),
              static_cast<long long>(st.kv_pages_total), static_cast<long long>(st.preemptions_total),
              static_cast<long long>(failed));
  std::printf("kv at the end of the requests: %lld / %lld entries kept (%.2fx)\n", static_cast<long long>(kv_kept),
              static_cast<long long>(kv_full), kv_kept > 0 ? static_cast<double>(kv_full) / kv_kept : 0.0);
  // One machine-readable line for scripts and docs/benchmarks.md.
  std::printf("RESULT device=%s policy=%s budget=%d requests=%lld prompt=%lld output=%lld pool_pages=%lld wall_s=%.3f "
              "gen_tok_s=%.2f total_tok_s=%.2f p50_s=%.3f p99_s=%.3f ttft_p50_s=%.3f ttft_p99_s=%.3f peak_running=%lld "
              "peak_pages=%lld preemptions=%lld failed=%lld\n",
              a.device.c_str(), kv_policy_name(compress.policy), compress.budget, static_cast<long long>(a.requests),
              static_cast<long long>(a.prompt_tokens), static_cast<long long>(a.output_tokens),
              static_cast<long long>(st.kv_pages_total), wall, generated / wall, (prompt_total + generated) / wall,
              percentile(latency, 50), percentile(latency, 99), percentile(ttft, 50), percentile(ttft, 99),
              static_cast<long long>(st.peak_running), static_cast<long long>(st.peak_kv_pages_used),
              static_cast<long long>(st.preemptions_total), static_cast<long long>(failed));
  if (failed > 0) fail(internal_error(std::to_string(failed) + " of " + std::to_string(a.requests) + " requests failed"));
}

}  // namespace

void register_bench(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "In-process benchmarks");
  bench->require_subcommand(1);
  auto a = std::make_shared<BenchServeArgs>();
  CLI::App* cmd = bench->add_subcommand("serve", "N concurrent requests through the engine: throughput, latency, KV use");
  cmd->add_option("--model", a->model_dir, "Hugging Face checkpoint folder (with --random-weights: the tokenizer)")
      ->required();
  cmd->add_option("--device", a->device, "cpu | cuda | auto")->capture_default_str();
  cmd->add_option("--random-weights", a->random_weights, "cuda: config.json of a model built with random weights");
  cmd->add_option("--gpu-memory-fraction", a->gpu_memory_fraction,
                  "cuda: share of the free memory for the KV pool when no --kv-memory / --kv-pages")
      ->capture_default_str();
  cmd->add_option("-n,--requests", a->requests, "Concurrent requests (all submitted at once)")->capture_default_str();
  cmd->add_option("--prompt-tokens", a->prompt_tokens, "Prompt length of every request")->capture_default_str();
  cmd->add_option("--output-tokens", a->output_tokens, "Tokens generated per request")->capture_default_str();
  cmd->add_option("--prompts", a->prompts, "haystack (stretches of --haystack) | random (token ids)")->capture_default_str();
  cmd->add_option("--haystack", a->haystack, "Text the prompts are cut from")->capture_default_str();
  // The same size syntax as `adakv serve` (CLI11: 64MB, 1GB, 1G, ...; binary units).
  cmd->add_option("--kv-memory", a->kv_memory, "K/V bytes of the pool, e.g. 64MB, 4GB; 0: 1 GiB")
      ->transform(CLI::AsSizeValue(false));
  cmd->add_option("--kv-pages", a->kv_pages, "Pool size in pages (overrides --kv-memory)")->capture_default_str();
  cmd->add_option("--page-size", a->page_size, "Tokens per page")->capture_default_str();
  cmd->add_option("--max-running", a->max_running, "Sequences decoding at once")->capture_default_str();
  cmd->add_option("--prefill-chunk", a->prefill_chunk, "Prompt tokens per prefill step")->capture_default_str();
  cmd->add_option("--max-step-tokens", a->max_step_tokens, "Tokens per step; 0: max-running + prefill-chunk")
      ->capture_default_str();
  cmd->add_flag("--stop-at-eos", a->stop_at_eos, "Let end tokens stop requests early (default: exactly --output-tokens)");
  cmd->add_option("--seed", a->seed, "Seed of --prompts random")->capture_default_str();
  add_kv_flags(cmd, a->kv);
  cmd->callback([a] { run_bench_serve(*a); });
}

}  // namespace adakv::cli
