#include "server/api_server.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>

#include "io/tokenizer.h"
#include "model/model_config.h"
#include "server/stop_matcher.h"

namespace adakv::server {
namespace {

using http::HttpRequest;
using http::HttpResponse;
using http::ResponseWriter;

// How often a handler waiting for tokens checks whether its client is still there.
constexpr auto kDisconnectPoll = std::chrono::milliseconds(50);

// Events of one request: the engine's callback (scheduler thread) pushes, the handler pops.
// Shared, because a handler that returns early (client gone) leaves the callback behind.
struct EventQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<TokenEvent> events;

  void push(const TokenEvent& e) {
    {
      std::lock_guard lock(mu);
      events.push_back(e);
    }
    cv.notify_one();
  }
  std::deque<TokenEvent> wait(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu);
    cv.wait_for(lock, timeout, [&] { return !events.empty(); });
    std::deque<TokenEvent> out;
    out.swap(events);
    return out;
  }
};

struct ActiveGuard {
  std::atomic<int64_t>& n;
  explicit ActiveGuard(std::atomic<int64_t>& c) : n(c) { ++n; }
  ~ActiveGuard() { --n; }
};

// Equal-time comparison, so that the key cannot be guessed byte by byte from response times.
bool same_key(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

bool iequals_prefix(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i) {
    char c = s[i];
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
    if (c != prefix[i]) return false;
  }
  return true;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A submit refusal of the engine as an API error: the caller's mistake is a 400.
ApiError submit_error(const Status& s, bool shutting_down) {
  ApiError e;
  e.message = s.message();
  if (shutting_down) return error_for_status(503, s.message());
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kUnimplemented:
      e.status = 400;
      break;
    case StatusCode::kOutOfRange:
      e.status = 400;
      e.code = "context_length_exceeded";
      break;
    case StatusCode::kResourceExhausted:
      e.status = 400;
      e.code = "kv_pool_too_small";
      break;
    default:
      e = error_for_status(shutting_down ? 503 : 500, s.message());
      break;
  }
  return e;
}

}  // namespace

ApiServer::ApiServer(ApiServerOptions options) : options_(std::move(options)) {}

void ApiServer::attach_engine(Engine* engine, ApiDefaults defaults) {
  defaults_ = std::move(defaults);
  // Non-owning: the engine owns its tokenizer and outlives every handler.
  tokenizer_ = std::shared_ptr<const Tokenizer>(std::shared_ptr<const Tokenizer>(), &engine->tokenizer());
  stop_ids_ = engine->config().eos_token_ids;
  for (int32_t id : engine->tokenizer().eos_ids()) {
    if (std::find(stop_ids_.begin(), stop_ids_.end(), id) == stop_ids_.end()) stop_ids_.push_back(id);
  }
  engine_.store(engine);
}

void ApiServer::begin_shutdown() { shutting_down_ = true; }

HttpResponse ApiServer::http_error(int status, const std::string& message) {
  HttpResponse r;
  r.status = status;
  r.body = error_json(error_for_status(status, message));
  return r;
}

void ApiServer::send_json(ResponseWriter& w, const std::string& route, int status, std::string body) {
  HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  counters_.count_response(route, status);
  w.send(r);
}

void ApiServer::send_error(ResponseWriter& w, const std::string& route, const ApiError& e) {
  HttpResponse r;
  r.status = e.status;
  r.body = error_json(e);
  if (e.status == 401) r.headers.emplace_back("WWW-Authenticate", "Bearer");
  counters_.count_response(route, e.status);
  w.send(r);
}

void ApiServer::handle(const HttpRequest& req, ResponseWriter& w) {
  struct Route {
    const char* path;
    const char* method;
  };
  static constexpr Route kRoutes[] = {{"/health", "GET"},
                                      {"/metrics", "GET"},
                                      {"/v1/models", "GET"},
                                      {"/v1/completions", "POST"},
                                      {"/v1/chat/completions", "POST"}};
  const std::string& path = req.path;
  const bool model_route = path.rfind("/v1/models/", 0) == 0 && path.size() > 11;
  const Route* route = nullptr;
  for (const Route& r : kRoutes) {
    if (path == r.path) route = &r;
  }
  const std::string label = route ? route->path : model_route ? "/v1/models/{id}" : "other";

  if (!options_.api_key.empty() && path.rfind("/v1/", 0) == 0) {
    auto auth = req.header("authorization");
    if (!auth) {
      send_error(w, label, error_for_status(401, "missing API key: send the header 'Authorization: Bearer <key>'"));
      return;
    }
    std::string_view v = *auth;
    if (!iequals_prefix(v, "bearer ") || !same_key(v.substr(7), options_.api_key)) {
      send_error(w, label, error_for_status(401, "incorrect API key"));
      return;
    }
  }
  if (!route && !model_route) {
    send_error(w, label, error_for_status(404, "unknown route: " + req.method + " " + path));
    return;
  }
  const char* method = route ? route->method : "GET";
  if (req.method != method) {
    ApiError e = error_for_status(405, "method " + req.method + " is not allowed on " + path + ": use " + method);
    HttpResponse r;
    r.status = 405;
    r.body = error_json(e);
    r.headers.emplace_back("Allow", method);
    counters_.count_response(label, 405);
    w.send(r);
    return;
  }

  Engine* engine = engine_.load();
  if (path == "/health") {
    HttpResponse r;
    r.content_type = "text/plain; charset=utf-8";
    r.status = engine ? 200 : 503;
    r.body = engine ? "ok\n" : "loading\n";
    if (engine && shutting_down_) {
      r.status = 503;
      r.body = "shutting down\n";
    }
    counters_.count_response(label, r.status);
    w.send(r);
    return;
  }
  if (path == "/metrics") {
    HttpResponse r;
    r.content_type = "text/plain; version=0.0.4; charset=utf-8";
    std::optional<EngineStats> stats;
    if (engine) stats = engine->stats();
    counters_.count_response(label, 200);
    r.body = metrics_text(stats, counters_, engine != nullptr);
    w.send(r);
    return;
  }
  if (!engine) {
    send_error(w, label, error_for_status(503, "the model is still loading"));
    return;
  }
  if (path == "/v1/models") {
    send_json(w, label, 200, models_json(defaults_.model_name, options_.created));
    return;
  }
  if (model_route) {
    const std::string id = path.substr(11);
    if (id != defaults_.model_name) {
      ApiError e = error_for_status(404, "The model '" + id + "' does not exist");
      e.code = "model_not_found";
      send_error(w, label, e);
      return;
    }
    nlohmann::ordered_json list = nlohmann::ordered_json::parse(models_json(defaults_.model_name, options_.created));
    send_json(w, label, 200, list["data"][0].dump());
    return;
  }
  handle_generate(req, w, path == "/v1/completions" ? ApiKind::kCompletion : ApiKind::kChat, label);
}

void ApiServer::handle_generate(const HttpRequest& req, ResponseWriter& w, ApiKind kind, const std::string& route) {
  ActiveGuard active(counters_.generations_active);
  if (shutting_down_) {
    send_error(w, route, error_for_status(503, "the server is shutting down"));
    return;
  }
  Engine* engine = engine_.load();
  // The body is read as JSON whatever its Content-Type says (curl -d sends form-urlencoded).
  GenerationRequest g;
  if (auto err = parse_generation_request(req.body, kind, defaults_, g)) {
    send_error(w, route, *err);
    return;
  }

  // The prompt's token ids.
  std::vector<int32_t> prompt;
  const char* prompt_param = kind == ApiKind::kChat ? "messages" : "prompt";
  if (kind == ApiKind::kChat) {
    if (!options_.chat_template) {
      ApiError e;
      e.message = "this model has no chat template (" + options_.no_chat_template_reason + "); use /v1/completions";
      e.param = "messages";
      send_error(w, route, e);
      return;
    }
    ChatRenderOptions opt;
    opt.add_generation_prompt = true;
    opt.extra_vars = g.chat_template_kwargs;
    auto text = options_.chat_template->render(g.messages, opt);
    if (!text) {
      ApiError e;
      e.message = "the chat template refused the messages: " + text.status().message();
      e.param = "messages";
      send_error(w, route, e);
      return;
    }
    // The template writes the special tokens (BOS) itself, as transformers' apply_chat_template.
    prompt = tokenizer_->encode(*text, /*add_special=*/false);
  } else if (g.prompt_text) {
    prompt = tokenizer_->encode(*g.prompt_text, /*add_special=*/true);
  } else {
    const int32_t vocab = tokenizer_->vocab_size();
    for (int32_t id : g.prompt_ids) {
      if (id >= vocab) {
        ApiError e;
        e.message = "prompt token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(vocab);
        e.param = "prompt";
        send_error(w, route, e);
        return;
      }
    }
    prompt = std::move(g.prompt_ids);
  }
  const int64_t ctx = engine->context_length();
  const auto n_prompt = static_cast<int64_t>(prompt.size());
  if (n_prompt == 0) {
    ApiError e;
    e.message = "the prompt is empty";
    e.param = prompt_param;
    send_error(w, route, e);
    return;
  }
  if (n_prompt >= ctx) {
    ApiError e;
    e.message = "This model's maximum context length is " + std::to_string(ctx) + " tokens. However, your prompt has " +
                std::to_string(n_prompt) + " tokens, which leaves no room for a completion.";
    e.param = prompt_param;
    e.code = "context_length_exceeded";
    send_error(w, route, e);
    return;
  }
  // OpenAI's legacy completions default to 16 new tokens; chat to the rest of the context.
  const int64_t max_new = g.max_tokens.value_or(kind == ApiKind::kCompletion ? std::min<int64_t>(16, ctx - n_prompt)
                                                                               : ctx - n_prompt);
  if (n_prompt + max_new > ctx) {
    ApiError e;
    e.message = "This model's maximum context length is " + std::to_string(ctx) + " tokens. However, you requested " +
                std::to_string(n_prompt + max_new) + " tokens (" + std::to_string(n_prompt) + " in the prompt, " +
                std::to_string(max_new) + " in the completion). Please reduce the prompt or max_tokens.";
    e.param = "max_tokens";
    e.code = "context_length_exceeded";
    send_error(w, route, e);
    return;
  }

  RequestParams params;
  params.prompt = std::move(prompt);
  params.max_new_tokens = max_new;
  params.sampling = g.sampling;
  // Without a seed, sampling differs from call to call, as with OpenAI.
  if (!g.seed_given && params.sampling.temperature > 0.0f) params.sampling.seed = std::random_device{}();
  params.stop_ids = stop_ids_;
  params.ignore_eos = g.ignore_eos;
  params.compress = g.compress;

  auto queue = std::make_shared<EventQueue>();
  Expected<RequestId> submitted = engine->submit(std::move(params), [queue](const TokenEvent& e) { queue->push(e); });
  if (!submitted) {
    send_error(w, route, submit_error(submitted.status(), shutting_down_));
    return;
  }
  const RequestId id = *submitted;

  ResponseMeta meta;
  meta.kind = kind;
  meta.id = new_response_id(kind);
  meta.created = unix_now();
  meta.model = defaults_.model_name;

  StreamDecoder decoder(tokenizer_, /*skip_special=*/true);
  StopMatcher stops(g.stop);
  std::string text;              // non-streaming: the whole completion
  int64_t completion_tokens = 0;
  RequestUsage usage;
  usage.prompt_tokens = n_prompt;
  const char* finish_reason = nullptr;
  std::optional<ApiError> failure;  // the request ended in an error after it was accepted

  if (g.stream) {
    if (!w.start_stream(200, "text/event-stream", {{"Cache-Control", "no-cache"}})) {
      engine->cancel(id);
      ++counters_.cancelled_by_disconnect;
      return;
    }
    counters_.count_response(route, 200);
    // The first chunk of a chat stream announces the role, as OpenAI's does.
    if (kind == ApiKind::kChat && !w.write(http::sse_event(stream_chunk_json(meta, "", true, nullptr, g.include_usage)))) {
      engine->cancel(id);
      ++counters_.cancelled_by_disconnect;
      return;
    }
  }
  // Releases `piece` to the client; false when the client is gone.
  auto emit = [&](const std::string& piece) -> bool {
    if (piece.empty()) return true;
    if (!g.stream) {
      text += piece;
      return true;
    }
    return w.write(http::sse_event(stream_chunk_json(meta, piece, false, nullptr, g.include_usage)));
  };

  bool done = false;
  auto last_check = std::chrono::steady_clock::now();
  while (!done) {
    std::deque<TokenEvent> events = queue->wait(kDisconnectPoll);
    // Checked by the clock, not only when idle: a non-streaming request writes nothing until
    // its end, however busy its token stream is.
    if (std::chrono::steady_clock::now() - last_check >= kDisconnectPoll || events.empty()) {
      last_check = std::chrono::steady_clock::now();
      if (w.client_gone()) {
        engine->cancel(id);  // frees its pages; the callback keeps the queue alive
        ++counters_.cancelled_by_disconnect;
        return;
      }
    }
    for (const TokenEvent& ev : events) {
      usage = ev.usage;
      const bool end_token = ev.finished && ev.reason == FinishReason::kStop &&
                             std::find(stop_ids_.begin(), stop_ids_.end(), ev.token) != stop_ids_.end();
      if (ev.token >= 0 && !end_token) {
        ++completion_tokens;
        if (!emit(stops.push(decoder.push(ev.token)))) {
          engine->cancel(id);
          ++counters_.cancelled_by_disconnect;
          return;
        }
        if (stops.stopped()) {
          engine->cancel(id);
          ++counters_.stopped_by_stop_string;
          finish_reason = "stop";
          done = true;
          break;
        }
      }
      if (ev.finished) {
        done = true;
        switch (ev.reason) {
          case FinishReason::kStop: finish_reason = "stop"; break;
          case FinishReason::kLength: finish_reason = "length"; break;
          case FinishReason::kCancelled:
            ++counters_.cancelled_by_shutdown;
            failure = error_for_status(503, "the request was cancelled: the server is shutting down");
            break;
          default: {
            ApiError e = error_for_status(500, "generation failed: " + (ev.error.is_ok() ? std::string("unknown error")
                                                                                         : ev.error.message()));
            failure = e;
            break;
          }
        }
        break;
      }
    }
  }
  if (!failure && !stops.stopped()) {
    if (!emit(stops.push(decoder.finish())) || !emit(stops.finish())) return;
  }
  // Counted by the server, so that a stop string cut shows the tokens actually used.
  usage.generated_tokens = completion_tokens;
  const nlohmann::ordered_json usage_obj = usage_json(usage, completion_tokens);

  if (!g.stream) {
    if (failure) {
      send_error(w, route, *failure);
      return;
    }
    send_json(w, route, 200, completion_response_json(meta, text, finish_reason, usage_obj));
    return;
  }
  if (failure) {
    // The head went out with 200: the error travels as an event, then the stream ends.
    w.write(http::sse_event(error_json(*failure)));
  } else {
    w.write(http::sse_event(stream_chunk_json(meta, "", false, finish_reason, g.include_usage)));
    if (g.include_usage) w.write(http::sse_event(stream_usage_chunk_json(meta, usage_obj)));
  }
  w.write(http::sse_event("[DONE]"));
  w.finish();
}

}  // namespace adakv::server
