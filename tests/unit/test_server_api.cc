// The OpenAI wire format of `adakv serve` without an engine: request validation (every refusal
// a 400/404 naming the field), response, chunk and error JSON, stop strings over streamed text,
// and the /metrics exposition text.
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "server/openai_api.h"
#include "server/server_metrics.h"
#include "server/stop_matcher.h"

namespace adakv::server {
namespace {

using Json = nlohmann::json;

ApiDefaults defaults() {
  ApiDefaults d;
  d.model_name = "tiny";
  d.sampling.temperature = 0.0f;
  d.sampling.top_k = 50;
  return d;
}

std::optional<ApiError> parse(const std::string& body, ApiKind kind, GenerationRequest& out) {
  return parse_generation_request(body, kind, defaults(), out);
}

TEST(ServerApi, CompletionRequestFields) {
  GenerationRequest g;
  auto err = parse(R"({"model":"tiny","prompt":"hi","max_tokens":7,"temperature":0.5,"top_p":0.9,"top_k":-1,
                       "seed":42,"stop":["a","bc"],"stream":true,"stream_options":{"include_usage":true},
                       "user":"ignored","n":1,"logprobs":null,"echo":false})",
                   ApiKind::kCompletion, g);
  ASSERT_FALSE(err) << err->message;
  EXPECT_EQ(g.prompt_text.value(), "hi");
  EXPECT_EQ(g.max_tokens.value(), 7);
  EXPECT_FLOAT_EQ(g.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(g.sampling.top_p, 0.9f);
  EXPECT_EQ(g.sampling.top_k, 0);
  EXPECT_EQ(g.sampling.seed, 42u);
  EXPECT_TRUE(g.seed_given);
  EXPECT_EQ(g.stop, (std::vector<std::string>{"a", "bc"}));
  EXPECT_TRUE(g.stream);
  EXPECT_TRUE(g.include_usage);
  EXPECT_EQ(g.compress.policy, KvPolicy::kFull);
}

TEST(ServerApi, PromptForms) {
  GenerationRequest g;
  ASSERT_FALSE(parse(R"({"prompt":[1,2,3]})", ApiKind::kCompletion, g));
  EXPECT_EQ(g.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  ASSERT_FALSE(parse(R"({"prompt":[[4,5]]})", ApiKind::kCompletion, g));
  EXPECT_EQ(g.prompt_ids, (std::vector<int32_t>{4, 5}));
  ASSERT_FALSE(parse(R"({"prompt":["x"]})", ApiKind::kCompletion, g));
  EXPECT_EQ(g.prompt_text.value(), "x");
  EXPECT_EQ(parse(R"({"prompt":["x","y"]})", ApiKind::kCompletion, g)->param, "prompt");
  EXPECT_EQ(parse(R"({"prompt":[]})", ApiKind::kCompletion, g)->param, "prompt");
  EXPECT_EQ(parse(R"({"prompt":[1,-2]})", ApiKind::kCompletion, g)->param, "prompt");
  EXPECT_EQ(parse(R"({"max_tokens":3})", ApiKind::kCompletion, g)->code, "missing_required_parameter");
}

TEST(ServerApi, ChatMessages) {
  GenerationRequest g;
  auto err = parse(R"({"messages":[{"role":"system","content":"s"},
                                   {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],"name":"n"}],
                       "max_completion_tokens":5,"max_tokens":9,"chat_template_kwargs":{"enable_thinking":false}})",
                   ApiKind::kChat, g);
  ASSERT_FALSE(err) << err->message;
  ASSERT_EQ(g.messages.size(), 2u);
  EXPECT_EQ(g.messages[1].content.value(), "a\nb");
  EXPECT_EQ(g.messages[1].fields.at(0).first, "name");
  EXPECT_EQ(g.max_tokens.value(), 5);
  EXPECT_EQ(g.chat_template_kwargs["enable_thinking"], false);
  EXPECT_EQ(parse(R"({"messages":[]})", ApiKind::kChat, g)->param, "messages");
  EXPECT_EQ(parse(R"({"messages":[{"content":"x"}]})", ApiKind::kChat, g)->param, "messages[0].role");
  EXPECT_EQ(parse(R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})", ApiKind::kChat, g)->param,
            "messages[0].content[0]");
  EXPECT_EQ(parse(R"({"messages":[{"role":"user","content":5}]})", ApiKind::kChat, g)->code, "invalid_type");
}

TEST(ServerApi, Refusals) {
  struct Case {
    const char* body;
    int status;
    const char* param;
  };
  const Case cases[] = {
      {"{", 400, ""},
      {"", 400, ""},
      {"[1]", 400, ""},
      {R"({"prompt":"x","model":"other"})", 404, "model"},
      {R"({"prompt":"x","model":5})", 400, "model"},
      {R"({"prompt":"x","max_tokens":0})", 400, "max_tokens"},
      {R"({"prompt":"x","max_tokens":1.5})", 400, "max_tokens"},
      {R"({"prompt":"x","max_tokens":"5"})", 400, "max_tokens"},
      {R"({"prompt":"x","max_tokens":99999999999})", 400, "max_tokens"},
      {R"({"prompt":"x","temperature":3})", 400, "temperature"},
      {R"({"prompt":"x","temperature":true})", 400, "temperature"},
      {R"({"prompt":"x","top_p":0})", 400, "top_p"},
      {R"({"prompt":"x","top_k":-2})", 400, "top_k"},
      {R"({"prompt":"x","n":2})", 400, "n"},
      {R"({"prompt":"x","stop":[""]})", 400, "stop"},
      {R"({"prompt":"x","stop":[1]})", 400, "stop"},
      {R"({"prompt":"x","stream":"yes"})", 400, "stream"},
      {R"({"prompt":"x","stream_options":{"include_usage":true}})", 400, "stream_options"},
      {R"({"prompt":"x","logprobs":2})", 400, "logprobs"},
      {R"({"prompt":"x","echo":true})", 400, "echo"},
      {R"({"prompt":"x","best_of":3})", 400, "best_of"},
      {R"({"prompt":"x","presence_penalty":0.5})", 400, "presence_penalty"},
      {R"({"prompt":"x","kv_policy":"nope"})", 400, "kv_policy"},
      {R"({"prompt":"x","kv_policy":7})", 400, "kv_policy"},
      {R"({"prompt":"x","kv_policy":"snapkv","kv_budget":16,"kv_window":32})", 400, "kv_budget"},
      {R"({"prompt":"x","kv_policy":"snapkv","kv_budget":64,"kv_window":0})", 400, "kv_window"},
      {R"({"prompt":"x","kv_policy":"snapkv","kv_budget":64,"kv_alpha":2})", 400, "kv_alpha"},
      {R"({"prompt":"x","kv_policy":"snapkv","kv_budget":64,"kv_pool":"median"})", 400, "kv_pool"},
      {R"({"prompt":"x","kv_policy":"kvcompress"})", 400, "kv_max_cache_tokens"},
      {R"({"prompt":"x","kv_budget":-1})", 400, "kv_budget"},
  };
  for (const Case& c : cases) {
    GenerationRequest g;
    auto err = parse(c.body, ApiKind::kCompletion, g);
    ASSERT_TRUE(err) << c.body;
    EXPECT_EQ(err->status, c.status) << c.body;
    EXPECT_EQ(err->param, c.param) << c.body << " -> " << err->message;
    EXPECT_FALSE(err->message.empty());
    EXPECT_EQ(err->message.find("--kv"), std::string::npos) << err->message;  // fields, not flags
  }
}

// A body nesting arrays / objects deeper than 64 levels is refused before anything recurses over
// it (found by fuzz/fuzz_openai_request: 200000 levels in chat_template_kwargs overflowed the stack
// when serialised); brackets inside strings do not count, and 64 levels are still fine.
TEST(ServerApi, DeepNestingIsRefused) {
  auto nested = [](int levels) {
    std::string s;
    for (int i = 0; i < levels; ++i) s += "{\"a\":";
    s += "1";
    for (int i = 0; i < levels; ++i) s += "}";
    return s;
  };
  const std::string chat = R"({"messages":[{"role":"user","content":"hi"}],"chat_template_kwargs":)";
  GenerationRequest g;
  auto err = parse(chat + nested(200000) + "}", ApiKind::kChat, g);
  ASSERT_TRUE(err);
  EXPECT_EQ(err->status, 400);
  EXPECT_EQ(err->code, "invalid_json");
  EXPECT_NE(err->message.find("64 levels"), std::string::npos) << err->message;
  err = parse(R"({"prompt":)" + std::string(100000, '[') + std::string(100000, ']') + "}", ApiKind::kCompletion, g);
  ASSERT_TRUE(err);
  EXPECT_EQ(err->code, "invalid_json");
  // 63 levels of kwargs inside the 1-level body: 64 in all, accepted.
  EXPECT_FALSE(parse(chat + nested(63) + "}", ApiKind::kChat, g)) << "64 levels refused";
  EXPECT_TRUE(parse(chat + nested(64) + "}", ApiKind::kChat, g)) << "65 levels accepted";
  // Brackets inside strings (and escaped quotes) are text, not nesting.
  EXPECT_FALSE(parse(R"({"prompt":")" + std::string(1000, '[') + R"(\"{{{"})", ApiKind::kCompletion, g));
}

TEST(ServerApi, CompressionFieldsOverrideDefaults) {
  GenerationRequest g;
  auto err = parse(R"({"prompt":"x","kv_policy":"ada-snapkv","kv_budget":64,"kv_window":8,"kv_alpha":0.5,
                       "kv_pool":"avg","kv_pool_kernel":5,"kv_gqa":"max"})",
                   ApiKind::kCompletion, g);
  ASSERT_FALSE(err) << err->message;
  EXPECT_EQ(g.compress.policy, KvPolicy::kAdaSnapKv);
  EXPECT_EQ(g.compress.budget, 64);
  EXPECT_EQ(g.compress.window, 8);
  EXPECT_DOUBLE_EQ(g.compress.alpha, 0.5);
  EXPECT_EQ(g.compress.pool, PoolKind::kAvg);
  EXPECT_EQ(g.compress.pool_kernel, 5);
  EXPECT_EQ(g.compress.gqa, GqaReduce::kMax);
  ASSERT_FALSE(parse(R"({"prompt":"x","kv_policy":"kvcompress","kv_max_cache_tokens":100,"kv_protected_window":4})",
                     ApiKind::kCompletion, g));
  EXPECT_EQ(g.compress.max_cache_tokens, 100);
  EXPECT_EQ(g.compress.protected_window, 4);
}

TEST(ServerApi, ErrorJsonShape) {
  ApiError e;
  e.message = "bad \"thing\"";
  e.param = "kv_budget";
  Json j = Json::parse(error_json(e));
  EXPECT_EQ(j["error"]["message"], "bad \"thing\"");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["param"], "kv_budget");
  EXPECT_TRUE(j["error"]["code"].is_null());
  EXPECT_EQ(Json::parse(error_json(error_for_status(401, "no")))["error"]["code"], "invalid_api_key");
  EXPECT_EQ(Json::parse(error_json(error_for_status(500, "x")))["error"]["type"], "server_error");
  // Invalid UTF-8 in a message does not break the JSON.
  e.message = "bad \xff byte";
  EXPECT_NO_THROW(Json::parse(error_json(e)));
}

TEST(ServerApi, ResponseAndChunkJson) {
  ResponseMeta meta{ApiKind::kChat, "chatcmpl-1", 123, "tiny"};
  RequestUsage u;
  u.prompt_tokens = 10;
  u.kv_entries = 50;
  u.kv_full_entries = 200;
  Json usage = Json::parse(usage_json(u, 4).dump());
  EXPECT_EQ(usage["total_tokens"], 14);
  EXPECT_DOUBLE_EQ(usage["compression_ratio"].get<double>(), 4.0);

  Json r = Json::parse(completion_response_json(meta, "hi", "stop", usage_json(u, 4)));
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["choices"][0]["message"]["content"], "hi");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");

  Json first = Json::parse(stream_chunk_json(meta, "", true, nullptr, true));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(first.contains("usage") && first["usage"].is_null());
  Json last = Json::parse(stream_chunk_json(meta, "", false, "length", false));
  EXPECT_TRUE(last["choices"][0]["delta"].empty());
  EXPECT_FALSE(last.contains("usage"));
  Json usage_chunk = Json::parse(stream_usage_chunk_json(meta, usage_json(u, 4)));
  EXPECT_TRUE(usage_chunk["choices"].empty());

  meta.kind = ApiKind::kCompletion;
  Json c = Json::parse(stream_chunk_json(meta, "tok", false, nullptr, false));
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["choices"][0]["text"], "tok");
  EXPECT_EQ(new_response_id(ApiKind::kCompletion).rfind("cmpl-", 0), 0u);
  EXPECT_EQ(Json::parse(models_json("tiny", 1))["data"][0]["id"], "tiny");
}

TEST(StopMatcher, CutsAcrossPiecesAndHoldsBack) {
  StopMatcher m({"STOP", "xy"});
  std::string out;
  out += m.push("hello S");
  out += m.push("T");
  EXPECT_FALSE(m.stopped());
  out += m.push("OP and more");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(out, "hello ");
  EXPECT_EQ(m.push("later"), "");
  EXPECT_EQ(m.finish(), "");
}

TEST(StopMatcher, ReleasesEverythingWithoutStops) {
  StopMatcher none({});
  EXPECT_EQ(none.push("abc"), "abc");
  StopMatcher m({"zzzz"});
  std::string out = m.push("abcdef");
  out += m.finish();
  EXPECT_EQ(out, "abcdef");
}

TEST(StopMatcher, NeverSplitsUtf8) {
  // "é" is 2 bytes, "€" 3: the held-back tail must not start inside them.
  StopMatcher m({"abcd"});
  for (std::string piece : {"\xC3\xA9\xE2\x82\xAC", "x", "\xE2\x82\xAC"}) {
    std::string out = m.push(piece);
    if (!out.empty()) {
      EXPECT_NE(static_cast<unsigned char>(out.back()) & 0xC0, 0xC0) << "ends with a lead byte";
      EXPECT_NE(static_cast<unsigned char>(out.front()) & 0xC0, 0x80) << "starts with a continuation byte";
    }
  }
}

TEST(ServerMetrics, ExpositionText) {
  ServerCounters c;
  c.count_response("/v1/completions", 200);
  c.count_response("/v1/completions", 200);
  c.cancelled_by_disconnect = 3;
  EngineStats s;
  s.kv_pages_total = 100;
  s.kv_pages_used = 30;
  s.kv_entries_kept_total = 25;
  s.kv_entries_evicted_total = 75;
  const std::string text = metrics_text(s, c, true);
  EXPECT_NE(text.find("adakv_http_responses_total{route=\"/v1/completions\",code=\"200\"} 2\n"), std::string::npos);
  EXPECT_NE(text.find("adakv_requests_cancelled_total{reason=\"disconnect\"} 3\n"), std::string::npos);
  EXPECT_NE(text.find("adakv_kv_pages_free 70\n"), std::string::npos);
  EXPECT_NE(text.find("adakv_kv_compression_ratio 4\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE adakv_kv_pages_used gauge\n"), std::string::npos);
  const std::string loading = metrics_text(std::nullopt, c, false);
  EXPECT_NE(loading.find("adakv_ready 0\n"), std::string::npos);
  EXPECT_EQ(loading.find("adakv_kv_pages_total"), std::string::npos);
}

}  // namespace
}  // namespace adakv::server
