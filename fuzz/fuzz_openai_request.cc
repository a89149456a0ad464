// libFuzzer target: arbitrary bytes as the body of POST /v1/completions and /v1/chat/completions,
// through the OpenAI request parser and validator (src/server/openai_api.h). Checks what the
// server relies on: a refusal is an error with a status it may send (400 or 404), a message and
// a body that is valid JSON in OpenAI's shape; an accepted request has sampling and compression
// settings the engine accepts (validate_sampling / validate_compress_config), max_tokens in
// range, at most 16 non-empty stop strings, stream_options only with stream, a prompt (completion)
// or messages (chat); and the outcome is the same on a second parse.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/check.h"
#include "server/openai_api.h"

using adakv::server::ApiDefaults;
using adakv::server::ApiError;
using adakv::server::ApiKind;
using adakv::server::GenerationRequest;

namespace {

void check_one(std::string_view body, ApiKind kind, const ApiDefaults& defaults) {
  GenerationRequest req;
  const std::optional<ApiError> err = adakv::server::parse_generation_request(body, kind, defaults, req);
  GenerationRequest again;
  const std::optional<ApiError> err2 = adakv::server::parse_generation_request(body, kind, defaults, again);
  ADAKV_CHECK(err.has_value() == err2.has_value(), "a second parse disagrees");
  if (err) {
    ADAKV_CHECK(err->status == 400 || err->status == 404, "a refusal with a status the routes do not send");
    ADAKV_CHECK(!err->message.empty(), "a refusal without a message");
    ADAKV_CHECK(err->message == err2->message && err->param == err2->param, "a second parse refuses differently");
    const nlohmann::json j = nlohmann::json::parse(adakv::server::error_json(*err), nullptr, false);
    ADAKV_CHECK(!j.is_discarded() && j.contains("error") && j["error"]["message"].is_string(),
                "error_json is not OpenAI's error object");
    return;
  }
  ADAKV_CHECK(req.kind == kind, "kind changed");
  ADAKV_CHECK(adakv::validate_sampling(req.sampling).is_ok(), "accepted sampling the engine refuses");
  ADAKV_CHECK(adakv::validate_compress_config(req.compress).is_ok(), "accepted kv_* settings the engine refuses");
  ADAKV_CHECK(!req.max_tokens || (*req.max_tokens >= 1 && *req.max_tokens <= INT32_MAX), "max_tokens out of range");
  ADAKV_CHECK(req.stop.size() <= 16, "more than 16 stop strings");
  for (const std::string& s : req.stop) ADAKV_CHECK(!s.empty(), "an empty stop string");
  ADAKV_CHECK(req.stream || !req.include_usage, "include_usage without stream");
  if (kind == ApiKind::kCompletion)
    ADAKV_CHECK(req.prompt_text.has_value() || !req.prompt_ids.empty(), "a completion without a prompt");
  else
    ADAKV_CHECK(!req.messages.empty(), "a chat request without messages");
  ADAKV_CHECK(req.prompt_ids == again.prompt_ids && req.stop == again.stop, "a second parse accepts differently");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ApiDefaults defaults = [] {
    ApiDefaults d;
    d.model_name = "adakv-tiny-v1";
    return d;
  }();
  // A copy of exactly `size` bytes, so that ASan sees any read past the end.
  const std::string body(reinterpret_cast<const char*>(data), size);
  check_one(body, ApiKind::kCompletion, defaults);
  check_one(body, ApiKind::kChat, defaults);
  return 0;
}
