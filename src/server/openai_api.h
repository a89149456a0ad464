// The OpenAI-compatible wire format, as pure functions: request bodies of /v1/completions and
// /v1/chat/completions parsed and validated into a GenerationRequest (every refusal an ApiError
// naming the field), and the JSON of responses, stream chunks and errors. No engine here, so all
// of it is unit-tested without a model (tests/unit/test_server_api.cc).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "adakv/engine.h"
#include "compress/compress_config.h"
#include "engine/sampler.h"
#include "io/chat_template.h"

namespace adakv::server {

// OpenAI's error object: {"error": {"message", "type", "param", "code"}}; empty param and code
// are written as null.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;
  std::string code;
};

std::string error_json(const ApiError& error);
// The error for a status the HTTP layer or a route answers (401, 404, 413, 503, ...), with the
// type and code OpenAI uses for it.
ApiError error_for_status(int status, std::string message);

enum class ApiKind { kCompletion, kChat };

// What a request gets for each field it leaves out.
struct ApiDefaults {
  std::string model_name;        // the served model; a request naming another gets 404
  CompressConfig compress;       // server-wide --kv-* flags
  SamplingParams sampling;       // the checkpoint's generation_config.json
};

struct GenerationRequest {
  ApiKind kind = ApiKind::kCompletion;
  // kCompletion: the prompt as text (tokenised with the model's BOS) or as token ids.
  std::optional<std::string> prompt_text;
  std::vector<int32_t> prompt_ids;
  // kChat: rendered with the model's chat template.
  std::vector<ChatMessage> messages;
  nlohmann::ordered_json chat_template_kwargs = nlohmann::ordered_json::object();
  std::optional<int64_t> max_tokens;  // absent: 16 for completions, the rest of the context for chat
  SamplingParams sampling;
  bool seed_given = false;
  std::vector<std::string> stop;  // cut the text before the first of them
  bool stream = false;
  bool include_usage = false;     // stream_options.include_usage
  bool ignore_eos = false;        // extension (as vLLM)
  CompressConfig compress;        // defaults overridden by the kv_* extension fields
};

// Parses and validates a request body. On failure returns the error to answer with.
std::optional<ApiError> parse_generation_request(std::string_view body, ApiKind kind, const ApiDefaults& defaults,
                                                 GenerationRequest& out);

// The "usage" object: OpenAI's token counts plus adakv's kv_entries, kv_full_entries and
// compression_ratio (full / kept) of the request's cache.
nlohmann::ordered_json usage_json(const RequestUsage& usage, int64_t completion_tokens);

// finish_reason of a response: "stop" | "length".
struct ResponseMeta {
  ApiKind kind = ApiKind::kCompletion;
  std::string id;       // "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;  // unix seconds
  std::string model;
};

std::string completion_response_json(const ResponseMeta& meta, const std::string& text, const char* finish_reason,
                                     const nlohmann::ordered_json& usage);
// One stream chunk. `role_delta` adds {"role": "assistant"} to a chat delta (the first chunk);
// null finish_reason while generating; with include_usage every chunk carries "usage": null.
std::string stream_chunk_json(const ResponseMeta& meta, std::string_view text, bool role_delta,
                              const char* finish_reason, bool include_usage);
// The last chunk when include_usage: no choices, the usage.
std::string stream_usage_chunk_json(const ResponseMeta& meta, const nlohmann::ordered_json& usage);
// The /v1/models list.
std::string models_json(const std::string& model_name, int64_t created);

// A fresh response id with the kind's prefix.
std::string new_response_id(ApiKind kind);

}  // namespace adakv::server
