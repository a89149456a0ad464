// The OpenAI-compatible API over an Engine: routes (/health, /metrics, /v1/models,
// /v1/completions, /v1/chat/completions), API-key checks, prompt building (chat template,
// tokenizer), the token stream of each request turned into a response or server-sent events,
// stop strings, and cancellation when the client goes away. Talks to the engine only through
// include/adakv/engine.h.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "adakv/engine.h"
#include "io/chat_template.h"
#include "server/http_server.h"
#include "server/openai_api.h"
#include "server/server_metrics.h"

namespace adakv::server {

struct ApiServerOptions {
  std::string api_key;  // empty: no authentication
  std::optional<ChatTemplate> chat_template;  // none: chat requests get a 400 saying why
  std::string no_chat_template_reason;
  int64_t created = 0;  // unix time of start-up, reported by /v1/models
};

class ApiServer {
 public:
  explicit ApiServer(ApiServerOptions options);

  // The engine is loaded: /health answers 200 and requests are served from now on.
  // `defaults.model_name` is the served name. The engine must outlive the server's handlers.
  void attach_engine(Engine* engine, ApiDefaults defaults);
  // Generation requests that arrive from now on get 503 (shutting down).
  void begin_shutdown();
  void handle(const http::HttpRequest& request, http::ResponseWriter& writer);

  // Generation requests being answered now.
  int64_t generations_active() const { return counters_.generations_active.load(); }
  ServerCounters& counters() { return counters_; }

  // The OpenAI-shaped body of an error the HTTP layer answers itself.
  static http::HttpResponse http_error(int status, const std::string& message);

 private:
  void send_error(http::ResponseWriter& w, const std::string& route, const ApiError& e);
  void send_json(http::ResponseWriter& w, const std::string& route, int status, std::string body);
  void handle_generate(const http::HttpRequest& request, http::ResponseWriter& w, ApiKind kind, const std::string& route);

  ApiServerOptions options_;
  std::atomic<Engine*> engine_{nullptr};
  ApiDefaults defaults_;  // written once before engine_ is published
  std::shared_ptr<const Tokenizer> tokenizer_;
  std::vector<int32_t> stop_ids_;
  std::atomic<bool> shutting_down_{false};
  ServerCounters counters_;
};

}  // namespace adakv::server
