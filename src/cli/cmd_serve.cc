// adakv serve: the OpenAI-compatible HTTP server (src/server) over one Engine. It listens at
// once (so /health can answer 503 while the model loads), loads the engine, then serves until
// SIGINT or SIGTERM: it stops accepting, lets in-flight requests finish for --shutdown-grace
// seconds, cancels the rest, and exits 0.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "adakv/engine.h"
#include "cli/commands.h"
#include "cli/kv_flags.h"
#include "engine/generator.h"
#include "engine/model_runner_factory.h"
#include "io/chat_template.h"
#include "server/api_server.h"
#include "server/http_server.h"

namespace adakv::cli {
namespace {

struct ServeArgs {
  std::string model_dir;
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string api_key;
  std::string served_model_name;
  KvFlags kv;
  std::string device = "auto";
  double gpu_memory_fraction = 0.9;
  std::string random_weights;
  uint64_t kv_memory = 0;
  int64_t kv_pages = 0;
  int32_t page_size = 16;
  int32_t max_running = 64;
  int32_t max_step_tokens = 2048;
  int32_t prefill_chunk = 512;
  int32_t threads = 0;
  uint64_t max_body_bytes = 8u << 20;
  int http_threads = 128;
  double shutdown_grace = 30.0;
};

// SIGINT/SIGTERM go through a handler that writes the signal number to a pipe, which the main
// thread polls. (Blocking the signals and sigwait-ing is not enough: libraries such as OpenBLAS
// start threads before main, and a signal delivered to one of them would kill the process.)
int g_signal_pipe[2] = {-1, -1};

extern "C" void on_shutdown_signal(int sig) {
  const char c = static_cast<char>(sig);
  [[maybe_unused]] ssize_t n = ::write(g_signal_pipe[1], &c, 1);
}

void install_signal_handlers() {
  if (::pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) fail(internal_error("cannot create the signal pipe"));
  struct sigaction sa {};
  sa.sa_handler = on_shutdown_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);  // a vanished client is a failed write, not the end of the process
}

// Waits up to `timeout_ms` for SIGINT/SIGTERM; returns the signal or 0.
int wait_signal(int timeout_ms) {
  pollfd p{g_signal_pipe[0], POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) <= 0) return 0;
  char c = 0;
  return ::read(g_signal_pipe[0], &c, 1) == 1 ? static_cast<unsigned char>(c) : 0;
}

void run_serve(const ServeArgs& args) {
  const CompressConfig compress = kv_config_or_fail(args.kv);
  if (!std::filesystem::is_directory(args.model_dir)) fail(not_found(args.model_dir + ": no such model directory"));
  const SamplingParams sampling = value_or_fail(load_sampling_defaults(args.model_dir));

  // The chat template is compiled and tried once now: a template this renderer cannot handle
  // is an error at start-up, not at the first chat request. A checkpoint without any template
  // still serves /v1/completions.
  server::ApiServerOptions api_options;
  api_options.api_key = args.api_key;
  api_options.created = static_cast<int64_t>(std::time(nullptr));
  Expected<ChatTemplate> tmpl = load_chat_template(args.model_dir);
  if (tmpl) {
    ChatRenderOptions probe;
    probe.add_generation_prompt = true;
    auto rendered = tmpl->render({ChatMessage("system", "You are helpful."), ChatMessage("user", "Hello!")}, probe);
    if (!rendered) rendered = tmpl->render({ChatMessage("user", "Hello!")}, probe);  // templates without a system role
    if (!rendered) fail(rendered.status().with_context("the chat template cannot be rendered"));
    api_options.chat_template = std::move(*tmpl);
  } else if (tmpl.status().code() == StatusCode::kNotFound) {
    api_options.no_chat_template_reason = tmpl.status().message();
    std::fprintf(stderr, "adakv: warning: %s; /v1/chat/completions will refuse requests\n",
                 tmpl.status().message().c_str());
  } else {
    fail(tmpl.status());
  }

  install_signal_handlers();

  auto api = std::make_shared<server::ApiServer>(std::move(api_options));
  http::HttpServerOptions http_options;
  http_options.host = args.host;
  http_options.port = args.port;
  http_options.limits.max_body_bytes = args.max_body_bytes;
  http_options.worker_threads = args.http_threads;
  std::unique_ptr<http::HttpServer> http_server = value_or_fail(http::HttpServer::start(
      http_options, [api](const http::HttpRequest& req, http::ResponseWriter& w) { api->handle(req, w); },
      &server::ApiServer::http_error));
  std::fprintf(stderr, "adakv: listening on http://%s:%d (loading %s)\n", args.host.c_str(), http_server->port(),
               args.model_dir.c_str());

  EngineOptions eo;
  eo.model_dir = args.model_dir;
  eo.device = args.device;
  eo.gpu_memory_fraction = args.gpu_memory_fraction;
  eo.random_weights = args.random_weights;
  eo.page_size = args.page_size;
  eo.kv_pages = args.kv_pages;
  eo.kv_memory_bytes = static_cast<int64_t>(args.kv_memory);
  eo.max_running = args.max_running;
  eo.max_step_tokens = args.max_step_tokens;
  eo.prefill_chunk = args.prefill_chunk;
  eo.threads = args.threads;
  eo.default_compress = compress;

  // Load on another thread so that this one keeps taking signals.
  const auto load_start = std::chrono::steady_clock::now();
  Expected<std::unique_ptr<Engine>> loaded = Status(StatusCode::kInternal, "not loaded");
  std::atomic<bool> load_done{false};
  std::thread loader([&] {
    loaded = Engine::create(eo);
    load_done = true;
  });
  int sig = 0;
  while (!load_done.load()) {
    if (int s = wait_signal(100)) sig = s;
  }
  loader.join();
  if (!loaded) {
    http_server->stop();
    fail(loaded.status());
  }
  std::unique_ptr<Engine> engine = std::move(loaded).value();
  server::ApiDefaults defaults;
  defaults.model_name = args.served_model_name.empty()
                            ? std::filesystem::canonical(args.model_dir).filename().string()
                            : args.served_model_name;
  defaults.compress = compress;
  defaults.sampling = sampling;
  const std::string model_name = defaults.model_name;
  if (sig == 0) {
    api->attach_engine(engine.get(), std::move(defaults));
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    std::fprintf(stderr,
                 "adakv: serving '%s' on http://%s:%d (device %s, loaded in %.2f s, kv policy %s, %lld kv pages)\n",
                 model_name.c_str(), args.host.c_str(), http_server->port(), device_label(args.device).c_str(), secs,
                 kv_policy_name(compress.policy), static_cast<long long>(engine->stats().kv_pages_total));
    while (sig == 0) sig = wait_signal(1000);
  }

  // Graceful shutdown: refuse new work, let running requests finish within the grace period,
  // then cancel what is left (a second signal cancels at once).
  std::fprintf(stderr, "adakv: %s: shutting down (grace %.1f s)\n", sig == SIGINT ? "SIGINT" : "SIGTERM",
               args.shutdown_grace);
  api->begin_shutdown();
  http_server->stop_accepting();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(args.shutdown_grace);
  while (api->generations_active() > 0 && std::chrono::steady_clock::now() < deadline) {
    if (wait_signal(50)) break;
  }
  const int64_t left = api->generations_active();
  if (left > 0) std::fprintf(stderr, "adakv: cancelling %lld request(s) still running\n", static_cast<long long>(left));
  engine->shutdown(/*drain=*/false);
  http_server->stop();
  http_server.reset();
  engine.reset();
  std::fprintf(stderr, "adakv: stopped\n");
}

}  // namespace

void register_serve(CLI::App& app) {
  auto args = std::make_shared<ServeArgs>();
  CLI::App* cmd = app.add_subcommand("serve", "Serve the model over an OpenAI-compatible HTTP API");
  cmd->add_option("--model", args->model_dir, "Hugging Face checkpoint folder")->required();
  cmd->add_option("--host", args->host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", args->port, "Port to listen on (0: any free port)")->capture_default_str()->check(CLI::Range(0, 65535));
  cmd->add_option("--api-key", args->api_key, "Require 'Authorization: Bearer KEY' on /v1/*");
  cmd->add_option("--served-model-name", args->served_model_name, "Model id of the API (default: the folder's name)");
  cmd->add_option("--device", args->device, "cpu | cuda | auto (cuda when a GPU is usable)")->capture_default_str();
  cmd->add_option("--gpu-memory-fraction", args->gpu_memory_fraction,
                  "cuda: share of the GPU memory left after weights for the KV pool (when --kv-memory and --kv-pages are 0)")
      ->capture_default_str();
  cmd->add_option("--random-weights", args->random_weights,
                  "cuda: a config.json to build with random bf16 weights (benchmarks); --model gives the tokenizer");
  cmd->add_option("--kv-memory", args->kv_memory, "K/V bytes of the page pool, e.g. 2GB (default 1 GiB)")
      ->transform(CLI::AsSizeValue(false));
  cmd->add_option("--kv-pages", args->kv_pages, "Pool size in pages (overrides --kv-memory)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--page-size", args->page_size, "Tokens per page of one (sequence, layer, kv head)")->capture_default_str();
  cmd->add_option("--max-running", args->max_running, "Sequences decoding at once")->capture_default_str();
  cmd->add_option("--max-step-tokens", args->max_step_tokens, "Tokens per engine step")->capture_default_str();
  cmd->add_option("--prefill-chunk", args->prefill_chunk, "Prompt tokens per prefill step")->capture_default_str();
  cmd->add_option("--threads", args->threads, "CPU threads of the forward pass (0: all cores)")->capture_default_str();
  cmd->add_option("--max-body-bytes", args->max_body_bytes, "Largest request body, e.g. 8MB")
      ->transform(CLI::AsSizeValue(false))
      ->capture_default_str();
  cmd->add_option("--http-threads", args->http_threads, "Requests handled at once (a stream holds one)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--shutdown-grace", args->shutdown_grace, "Seconds in-flight requests get to finish on SIGINT/SIGTERM")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  add_kv_flags(cmd, args->kv);
  cmd->callback([args] { run_serve(*args); });
}

}  // namespace adakv::cli
