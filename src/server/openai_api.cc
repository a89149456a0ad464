#include "server/openai_api.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>

namespace adakv::server {
namespace {

using Json = nlohmann::json;
using OJson = nlohmann::ordered_json;

const char* json_type_name(const Json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

ApiError bad_param(const std::string& param, std::string message, std::string code = {}) {
  ApiError e;
  e.status = 400;
  e.message = std::move(message);
  e.param = param;
  e.code = std::move(code);
  return e;
}

ApiError wrong_type(const std::string& param, const char* expected, const Json& got) {
  return bad_param(param, "'" + param + "' must be " + expected + ", got " + json_type_name(got), "invalid_type");
}

// A present, non-null field of `obj`, or nullptr.
const Json* field(const Json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<ApiError> get_int(const Json& obj, const char* name, int64_t lo, int64_t hi, std::optional<int64_t>& out) {
  const Json* v = field(obj, name);
  if (!v) return std::nullopt;
  // JSON has one number type; 16.0 is refused like OpenAI does, so that a typo does not round.
  if (!v->is_number_integer()) return wrong_type(name, "an integer", *v);
  int64_t x;
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return bad_param(name, "'" + std::string(name) + "' " + std::to_string(u) + " is out of range: allowed [" +
                                 std::to_string(lo) + ", " + std::to_string(hi) + "]");
    x = static_cast<int64_t>(u);
  } else {
    x = v->get<int64_t>();
  }
  if (x < lo || x > hi)
    return bad_param(name, "'" + std::string(name) + "' " + std::to_string(x) + " is out of range: allowed [" +
                               std::to_string(lo) + ", " + std::to_string(hi) + "]");
  out = x;
  return std::nullopt;
}

std::optional<ApiError> get_number(const Json& obj, const char* name, std::optional<double>& out) {
  const Json* v = field(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) return wrong_type(name, "a number", *v);
  out = v->get<double>();
  return std::nullopt;
}

std::optional<ApiError> get_bool(const Json& obj, const char* name, std::optional<bool>& out) {
  const Json* v = field(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) return wrong_type(name, "a boolean", *v);
  out = v->get<bool>();
  return std::nullopt;
}

std::optional<ApiError> get_string(const Json& obj, const char* name, std::optional<std::string>& out) {
  const Json* v = field(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_string()) return wrong_type(name, "a string", *v);
  out = v->get<std::string>();
  return std::nullopt;
}

#define API_TRY(expr)                          \
  do {                                         \
    if (auto api_err_ = (expr)) return api_err_; \
  } while (0)

// validate_compress_config speaks in CLI flags ("--kv-budget 8 is out of range"); a request
// names the field instead ("kv_budget 8 is out of range"), and the error's param is that field.
ApiError compress_error(const Status& s) {
  std::string m = s.message();
  std::string param;
  for (size_t pos = 0; (pos = m.find("kv-", pos)) != std::string::npos;) {
    size_t start = pos;
    if (start >= 2 && m.compare(start - 2, 2, "--") == 0) start -= 2;
    size_t end = pos + 3;
    while (end < m.size() && ((m[end] >= 'a' && m[end] <= 'z') || m[end] == '-')) ++end;
    std::string name = m.substr(pos, end - pos);
    for (char& c : name) c = c == '-' ? '_' : c;
    if (param.empty()) param = name;
    m.replace(start, end - start, name);
    pos = start + name.size();
  }
  return bad_param(param, m, "invalid_kv_config");
}

std::optional<ApiError> parse_compress(const Json& body, CompressConfig& c) {
  std::optional<std::string> s;
  API_TRY(get_string(body, "kv_policy", s));
  if (s) {
    auto p = parse_kv_policy(*s);
    if (!p) return bad_param("kv_policy", "unknown kv_policy '" + *s + "': allowed " + kv_policy_names(), "unknown_kv_policy");
    c.policy = *p;
  }
  s.reset();
  API_TRY(get_string(body, "kv_pool", s));
  if (s) {
    auto p = parse_pool_kind(*s);
    if (!p) return bad_param("kv_pool", "unknown kv_pool '" + *s + "': allowed max | avg", "invalid_kv_config");
    c.pool = *p;
  }
  s.reset();
  API_TRY(get_string(body, "kv_gqa", s));
  if (s) {
    auto g = parse_gqa_reduce(*s);
    if (!g || *g == GqaReduce::kSum)
      return bad_param("kv_gqa", "unknown kv_gqa '" + *s + "': allowed mean | max", "invalid_kv_config");
    c.gqa = *g;
  }
  constexpr int64_t kI32 = std::numeric_limits<int32_t>::max();
  struct IntField {
    const char* name;
    int32_t* dst;
  };
  for (auto [name, dst] : {IntField{"kv_budget", &c.budget}, IntField{"kv_window", &c.window},
                           IntField{"kv_pool_kernel", &c.pool_kernel}, IntField{"kv_beta", &c.beta},
                           IntField{"kv_sink", &c.sink}, IntField{"kv_protected_window", &c.protected_window},
                           IntField{"kv_interval", &c.interval}}) {
    std::optional<int64_t> v;
    API_TRY(get_int(body, name, 0, kI32, v));
    if (v) *dst = static_cast<int32_t>(*v);
  }
  std::optional<int64_t> v;
  API_TRY(get_int(body, "kv_max_cache_tokens", 0, kI32, v));
  if (v) c.max_cache_tokens = *v;
  v.reset();
  API_TRY(get_int(body, "kv_seed", 0, std::numeric_limits<int64_t>::max(), v));
  if (v) c.seed = static_cast<uint64_t>(*v);
  std::optional<double> alpha;
  API_TRY(get_number(body, "kv_alpha", alpha));
  if (alpha) c.alpha = *alpha;
  Status valid = validate_compress_config(c);
  if (!valid.is_ok()) return compress_error(valid);
  return std::nullopt;
}

std::optional<ApiError> parse_prompt(const Json& body, GenerationRequest& out) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return bad_param("prompt", "'prompt' is required", "missing_required_parameter");
  const Json& p = *it;
  auto ids_from = [&](const Json& arr) -> std::optional<ApiError> {
    if (arr.empty()) return bad_param("prompt", "'prompt' is an empty list of token ids");
    for (const Json& t : arr) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > std::numeric_limits<int32_t>::max())
        return bad_param("prompt", "'prompt' token ids must be non-negative integers", "invalid_type");
      out.prompt_ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    return std::nullopt;
  };
  if (p.is_string()) {
    out.prompt_text = p.get<std::string>();
    return std::nullopt;
  }
  if (!p.is_array()) return wrong_type("prompt", "a string, a list of strings or a list of token ids", p);
  if (p.empty()) return bad_param("prompt", "'prompt' is an empty list");
  if (p[0].is_number_integer()) return ids_from(p);
  if (p.size() > 1) return bad_param("prompt", "only one prompt per request is supported, got " + std::to_string(p.size()));
  if (p[0].is_string()) {
    out.prompt_text = p[0].get<std::string>();
    return std::nullopt;
  }
  if (p[0].is_array()) return ids_from(p[0]);
  return wrong_type("prompt", "a string, a list of strings or a list of token ids", p);
}

std::optional<ApiError> parse_messages(const Json& body, GenerationRequest& out) {
  auto it = body.find("messages");
  if (it == body.end() || it->is_null()) return bad_param("messages", "'messages' is required", "missing_required_parameter");
  if (!it->is_array()) return wrong_type("messages", "an array", *it);
  if (it->empty()) return bad_param("messages", "'messages' must not be empty");
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& m = (*it)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return wrong_type(where, "an object", m);
    const Json* role = field(m, "role");
    if (!role) return bad_param(where + ".role", "'" + where + ".role' is required", "missing_required_parameter");
    if (!role->is_string()) return wrong_type(where + ".role", "a string", *role);
    ChatMessage msg;
    msg.role = role->get<std::string>();
    if (const Json* content = field(m, "content")) {
      if (content->is_string()) {
        msg.content = content->get<std::string>();
      } else if (content->is_array()) {
        // Text parts joined by newlines, as vLLM gives them to a template that expects a string.
        std::string text;
        for (size_t k = 0; k < content->size(); ++k) {
          const Json& part = (*content)[k];
          const std::string pw = where + ".content[" + std::to_string(k) + "]";
          const Json* type = part.is_object() ? field(part, "type") : nullptr;
          const Json* t = part.is_object() ? field(part, "text") : nullptr;
          if (!type || !type->is_string() || type->get<std::string>() != "text" || !t || !t->is_string())
            return bad_param(pw, "'" + pw + "': only text content parts ({\"type\": \"text\", \"text\": ...}) are supported");
          if (k > 0) text += "\n";
          text += t->get<std::string>();
        }
        msg.content = std::move(text);
      } else {
        return wrong_type(where + ".content", "a string or an array of content parts", *content);
      }
    }
    for (const char* extra : {"name", "tool_call_id", "reasoning_content"}) {
      if (const Json* v = field(m, extra)) {
        if (!v->is_string()) return wrong_type(where + "." + extra, "a string", *v);
        msg.fields.emplace_back(extra, v->get<std::string>());
      }
    }
    if (const Json* calls = field(m, "tool_calls"); calls && !(calls->is_array() && calls->empty()))
      return bad_param(where + ".tool_calls", "tool calls are not supported");
    out.messages.push_back(std::move(msg));
  }
  return std::nullopt;
}

// Fields of the OpenAI API that this server does not implement: refused when set to anything
// but their neutral value, instead of silently ignored.
std::optional<ApiError> refuse_unsupported(const Json& body, ApiKind kind) {
  if (const Json* v = field(body, "logprobs")) {
    if (!(v->is_boolean() && !v->get<bool>()) && !(v->is_number_integer() && v->get<int64_t>() == 0))
      return bad_param("logprobs", "'logprobs' is not supported", "unsupported_parameter");
  }
  if (const Json* v = field(body, "top_logprobs"); v && !(v->is_number_integer() && v->get<int64_t>() == 0))
    return bad_param("top_logprobs", "'top_logprobs' is not supported", "unsupported_parameter");
  if (const Json* v = field(body, "echo"); v && !(v->is_boolean() && !v->get<bool>()))
    return bad_param("echo", "'echo' is not supported", "unsupported_parameter");
  if (const Json* v = field(body, "best_of"); v && !(v->is_number_integer() && v->get<int64_t>() == 1))
    return bad_param("best_of", "'best_of' must be 1", "unsupported_parameter");
  if (const Json* v = field(body, "suffix"); v && !(v->is_string() && v->get<std::string>().empty()))
    return bad_param("suffix", "'suffix' is not supported", "unsupported_parameter");
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    if (const Json* v = field(body, name); v && !(v->is_number() && v->get<double>() == 0.0))
      return bad_param(name, "'" + std::string(name) + "' is not supported (only 0)", "unsupported_parameter");
  }
  if (const Json* v = field(body, "logit_bias"); v && !(v->is_object() && v->empty()))
    return bad_param("logit_bias", "'logit_bias' is not supported", "unsupported_parameter");
  if (kind == ApiKind::kChat) {
    if (const Json* v = field(body, "tools"); v && !(v->is_array() && v->empty()))
      return bad_param("tools", "'tools' is not supported", "unsupported_parameter");
    if (const Json* v = field(body, "response_format")) {
      const Json* type = v->is_object() ? field(*v, "type") : nullptr;
      if (!type || !type->is_string() || type->get<std::string>() != "text")
        return bad_param("response_format", "only response_format {\"type\": \"text\"} is supported", "unsupported_parameter");
    }
  }
  return std::nullopt;
}

}  // namespace

std::string error_json(const ApiError& e) {
  OJson err = OJson::object();
  err["message"] = e.message;
  err["type"] = e.type;
  err["param"] = e.param.empty() ? OJson(nullptr) : OJson(e.param);
  err["code"] = e.code.empty() ? OJson(nullptr) : OJson(e.code);
  OJson out = OJson::object();
  out["error"] = std::move(err);
  return out.dump(-1, ' ', false, Json::error_handler_t::replace);
}

ApiError error_for_status(int status, std::string message) {
  ApiError e;
  e.status = status;
  e.message = std::move(message);
  switch (status) {
    case 401: e.code = "invalid_api_key"; break;
    case 404: e.code = "not_found"; break;
    case 405: e.code = "method_not_allowed"; break;
    case 408: e.code = "request_timeout"; break;
    case 411: e.code = "length_required"; break;
    case 413: e.code = "request_too_large"; break;
    case 431: e.code = "headers_too_large"; break;
    case 503: e.type = "service_unavailable"; e.code = "service_unavailable"; break;
    default:
      if (status >= 500) e.type = "server_error";
      break;
  }
  return e;
}

namespace {

// Deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count).
// Parsing is iterative, but serialising and template rendering recurse: a body of 8 MB could nest
// four million levels and overflow the stack, so a request is refused above kMaxJsonDepth first.
constexpr int kMaxJsonDepth = 64;
int json_depth(std::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char ch : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (ch == '\\') escaped = true;
      else if (ch == '"') in_string = false;
      continue;
    }
    if (ch == '"') in_string = true;
    else if (ch == '[' || ch == '{') deepest = std::max(deepest, ++depth);
    else if (ch == ']' || ch == '}') --depth;
  }
  return deepest;
}

}  // namespace

std::optional<ApiError> parse_generation_request(std::string_view body_text, ApiKind kind, const ApiDefaults& defaults,
                                                 GenerationRequest& out) {
  out = GenerationRequest{};
  out.kind = kind;
  out.sampling = defaults.sampling;
  out.compress = defaults.compress;
  if (json_depth(body_text) > kMaxJsonDepth) {
    ApiError e;
    e.message = "the request body nests arrays and objects deeper than " + std::to_string(kMaxJsonDepth) + " levels";
    e.code = "invalid_json";
    return e;
  }
  Json body = Json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    ApiError e;
    e.message = body_text.empty() ? "the request body is empty: expected a JSON object"
                                  : "the request body is not valid JSON";
    e.code = "invalid_json";
    return e;
  }
  if (!body.is_object()) {
    ApiError e;
    e.message = std::string("the request body must be a JSON object, got ") + json_type_name(body);
    e.code = "invalid_json";
    return e;
  }

  std::optional<std::string> model;
  API_TRY(get_string(body, "model", model));
  if (model && *model != defaults.model_name) {
    ApiError e;
    e.status = 404;
    e.message = "The model '" + *model + "' does not exist: this server serves '" + defaults.model_name + "'";
    e.param = "model";
    e.code = "model_not_found";
    return e;
  }

  if (kind == ApiKind::kCompletion) {
    API_TRY(parse_prompt(body, out));
  } else {
    API_TRY(parse_messages(body, out));
    if (const Json* kw = field(body, "chat_template_kwargs")) {
      if (!kw->is_object()) return wrong_type("chat_template_kwargs", "an object", *kw);
      out.chat_template_kwargs = OJson::parse(kw->dump());
    }
  }
  API_TRY(refuse_unsupported(body, kind));

  std::optional<int64_t> n;
  API_TRY(get_int(body, "n", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), n));
  if (n && *n != 1) return bad_param("n", "only n = 1 is supported, got " + std::to_string(*n), "unsupported_parameter");

  // max_completion_tokens is the chat API's newer name; it wins over max_tokens.
  constexpr int64_t kMaxTokens = std::numeric_limits<int32_t>::max();
  std::optional<int64_t> max_tokens;
  API_TRY(get_int(body, "max_tokens", 1, kMaxTokens, max_tokens));
  if (kind == ApiKind::kChat) {
    std::optional<int64_t> mct;
    API_TRY(get_int(body, "max_completion_tokens", 1, kMaxTokens, mct));
    if (mct) max_tokens = mct;
  }
  out.max_tokens = max_tokens;

  std::optional<double> temperature, top_p;
  API_TRY(get_number(body, "temperature", temperature));
  if (temperature) {
    if (!(*temperature >= 0.0 && *temperature <= 2.0))
      return bad_param("temperature", "'temperature' " + Json(*temperature).dump() + " is out of range: allowed [0, 2]");
    out.sampling.temperature = static_cast<float>(*temperature);
  }
  API_TRY(get_number(body, "top_p", top_p));
  if (top_p) {
    if (!(*top_p > 0.0 && *top_p <= 1.0))
      return bad_param("top_p", "'top_p' " + Json(*top_p).dump() + " is out of range: allowed (0, 1]");
    out.sampling.top_p = static_cast<float>(*top_p);
  }
  std::optional<int64_t> top_k;
  API_TRY(get_int(body, "top_k", -1, std::numeric_limits<int32_t>::max(), top_k));
  if (top_k) out.sampling.top_k = *top_k < 0 ? 0 : static_cast<int32_t>(*top_k);  // -1: off, as vLLM
  std::optional<int64_t> seed;
  API_TRY(get_int(body, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), seed));
  if (seed) {
    out.sampling.seed = static_cast<uint64_t>(*seed);
    out.seed_given = true;
  }

  if (const Json* stop = field(body, "stop")) {
    auto add = [&](const Json& s) -> std::optional<ApiError> {
      if (!s.is_string()) return wrong_type("stop", "a string or an array of strings", s);
      if (s.get<std::string>().empty()) return bad_param("stop", "'stop' strings must not be empty");
      out.stop.push_back(s.get<std::string>());
      return std::nullopt;
    };
    if (stop->is_array()) {
      if (stop->size() > 16) return bad_param("stop", "at most 16 'stop' strings are supported");
      for (const Json& s : *stop) API_TRY(add(s));
    } else {
      API_TRY(add(*stop));
    }
  }

  std::optional<bool> stream, ignore_eos;
  API_TRY(get_bool(body, "stream", stream));
  out.stream = stream.value_or(false);
  if (const Json* so = field(body, "stream_options")) {
    if (!so->is_object()) return wrong_type("stream_options", "an object", *so);
    if (!out.stream) return bad_param("stream_options", "'stream_options' is only allowed when 'stream' is true");
    std::optional<bool> include_usage;
    API_TRY(get_bool(*so, "include_usage", include_usage));
    out.include_usage = include_usage.value_or(false);
  }
  API_TRY(get_bool(body, "ignore_eos", ignore_eos));
  out.ignore_eos = ignore_eos.value_or(false);

  API_TRY(parse_compress(body, out.compress));
  return std::nullopt;
}

OJson usage_json(const RequestUsage& usage, int64_t completion_tokens) {
  OJson u = OJson::object();
  u["prompt_tokens"] = usage.prompt_tokens;
  u["completion_tokens"] = completion_tokens;
  u["total_tokens"] = usage.prompt_tokens + completion_tokens;
  u["kv_entries"] = usage.kv_entries;
  u["kv_full_entries"] = usage.kv_full_entries;
  u["compression_ratio"] = usage.compression_ratio();
  return u;
}

namespace {

OJson response_base(const ResponseMeta& meta, bool chunk) {
  OJson r = OJson::object();
  r["id"] = meta.id;
  if (meta.kind == ApiKind::kChat) {
    r["object"] = chunk ? "chat.completion.chunk" : "chat.completion";
  } else {
    r["object"] = "text_completion";
  }
  r["created"] = meta.created;
  r["model"] = meta.model;
  return r;
}

std::string dump(const OJson& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

}  // namespace

std::string completion_response_json(const ResponseMeta& meta, const std::string& text, const char* finish_reason,
                                     const OJson& usage) {
  OJson r = response_base(meta, false);
  OJson choice = OJson::object();
  choice["index"] = 0;
  if (meta.kind == ApiKind::kChat) {
    OJson message = OJson::object();
    message["role"] = "assistant";
    message["content"] = text;
    choice["message"] = std::move(message);
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason;
  r["choices"] = OJson::array({std::move(choice)});
  r["usage"] = usage;
  return dump(r);
}

std::string stream_chunk_json(const ResponseMeta& meta, std::string_view text, bool role_delta, const char* finish_reason,
                              bool include_usage) {
  OJson r = response_base(meta, true);
  OJson choice = OJson::object();
  choice["index"] = 0;
  if (meta.kind == ApiKind::kChat) {
    OJson delta = OJson::object();
    if (role_delta) delta["role"] = "assistant";
    if (!text.empty() || (role_delta && finish_reason == nullptr)) delta["content"] = std::string(text);
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = std::string(text);
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason ? OJson(finish_reason) : OJson(nullptr);
  r["choices"] = OJson::array({std::move(choice)});
  if (include_usage) r["usage"] = nullptr;
  return dump(r);
}

std::string stream_usage_chunk_json(const ResponseMeta& meta, const OJson& usage) {
  OJson r = response_base(meta, true);
  r["choices"] = OJson::array();
  r["usage"] = usage;
  return dump(r);
}

std::string models_json(const std::string& model_name, int64_t created) {
  OJson m = OJson::object();
  m["id"] = model_name;
  m["object"] = "model";
  m["created"] = created;
  m["owned_by"] = "adakv";
  OJson r = OJson::object();
  r["object"] = "list";
  r["data"] = OJson::array({std::move(m)});
  return dump(r);
}

std::string new_response_id(ApiKind kind) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(rng()));
  return std::string(kind == ApiKind::kChat ? "chatcmpl-" : "cmpl-") + hex;
}

}  // namespace adakv::server
