// The chat-template renderer against transformers: every case in
// tests/fixtures/chat_templates/cases.json (written by tools/fixtures/chat_templates.py from
// tokenizer.apply_chat_template and transformers' own jinja2 environment) must render
// byte-identical, or fail where jinja2 failed (raise_exception with the template's message).
// Then the renderer's own contract: unsupported or malformed templates fail at compile time
// naming the source and line, hostile templates end in an error (never a crash or a hang), and
// load_chat_template finds templates where transformers does.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/mapped_file.h"
#include "io/chat_template.h"

namespace adakv {
namespace {

using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

const ojson& fixtures() {
  static const ojson data = [] {
    auto text = read_text_file(std::string(ADAKV_FIXTURES_DIR) + "/chat_templates/cases.json");
    EXPECT_TRUE(text.has_value()) << text.status().message();
    return text.has_value() ? ojson::parse(*text) : ojson::object();
  }();
  return data;
}

std::tm tm_of(const ojson& now) {
  std::tm t{};
  t.tm_year = now[0].get<int>() - 1900;
  t.tm_mon = now[1].get<int>() - 1;
  t.tm_mday = now[2].get<int>();
  t.tm_hour = now[3].get<int>();
  t.tm_min = now[4].get<int>();
  t.tm_sec = now[5].get<int>();
  return t;
}

ChatTemplate compile_ok(const std::string& text, const std::string& source = "test.jinja") {
  auto t = ChatTemplate::compile(text, source);
  EXPECT_TRUE(t.has_value()) << t.status().message();
  return t.has_value() ? std::move(t).value() : ChatTemplate();
}

// Renders a bare snippet: `vars` as template variables, `messages` passed through when given.
Expected<std::string> render_snippet(const std::string& text, const ojson& vars, const std::string& source = "snippet") {
  ADAKV_ASSIGN_OR_RETURN(ChatTemplate t, ChatTemplate::compile(text, source));
  ChatRenderOptions o;
  ojson messages = ojson::array({{{"role", "user"}, {"content", ""}}});
  for (const auto& [k, v] : vars.items()) {
    if (k == "messages") {
      messages = v;
    } else {
      o.extra_vars[k] = v;
    }
  }
  o.now = tm_of(ojson::array({2024, 9, 5, 14, 3, 7}));
  return t.render_json(messages, o);
}

void expect_compile_error(const std::string& text, int line, const std::string& needle) {
  auto t = ChatTemplate::compile(text, "dir/tokenizer_config.json");
  ASSERT_FALSE(t.has_value()) << "compiled: " << text;
  const std::string& m = t.status().message();
  EXPECT_EQ(m.rfind("chat template dir/tokenizer_config.json: line " + std::to_string(line) + ": ", 0), 0u) << m;
  EXPECT_NE(m.find(needle), std::string::npos) << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << m;
}

// --- transformers references ------------------------------------------------------------------

TEST(ChatTemplateFixtures, EveryPublicTemplateCompiles) {
  ASSERT_GE(fixtures()["templates"].size(), 11u);
  for (const auto& [name, text] : fixtures()["templates"].items()) {
    auto t = ChatTemplate::compile(text.get<std::string>(), name);
    EXPECT_TRUE(t.has_value()) << name << ": " << t.status().message();
  }
}

TEST(ChatTemplateFixtures, ConversationsRenderLikeApplyChatTemplate) {
  const ojson& cases = fixtures()["cases"];
  ASSERT_GE(cases.size(), 150u);
  int rendered = 0, raised = 0;
  for (const auto& c : cases) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    ChatTemplate t = compile_ok(fixtures()["templates"][c["template"].get<std::string>()].get<std::string>(),
                                c["template"].get<std::string>());
    ChatRenderOptions o;
    o.add_generation_prompt = c["add_generation_prompt"].get<bool>();
    o.tools = c["tools"];
    o.extra_vars = c["vars"];
    o.now = tm_of(c["now"]);
    auto out = t.render_json(c["messages"], o);
    if (c.contains("expected")) {
      ASSERT_TRUE(out.has_value()) << out.status().message();
      EXPECT_EQ(*out, c["expected"].get<std::string>());
      ++rendered;
    } else {
      ASSERT_FALSE(out.has_value()) << "rendered: " << *out;
      EXPECT_EQ(c["error"]["type"], "TemplateError");  // these cases come from raise_exception
      const std::string& msg = out.status().message();
      EXPECT_EQ(out.status().code(), StatusCode::kInvalidArgument);
      EXPECT_EQ(msg.rfind("chat template " + c["template"].get<std::string>() + ": line ", 0), 0u) << msg;
      EXPECT_NE(msg.find(c["error"]["message"].get<std::string>()), std::string::npos) << msg;
      ++raised;
    }
  }
  EXPECT_GE(rendered, 140);
  EXPECT_GE(raised, 10);
}

TEST(ChatTemplateFixtures, SnippetsRenderLikeJinja) {
  const ojson& snippets = fixtures()["snippets"];
  ASSERT_GE(snippets.size(), 100u);
  int compile_errors = 0, rendered = 0, raised = 0;
  for (const auto& s : snippets) {
    const std::string name = s["name"];
    SCOPED_TRACE(name + ": " + s["template"].get<std::string>());
    const std::string text = s["template"];
    if (s["compile_error"].get<bool>()) {
      auto t = ChatTemplate::compile(text, "snip.jinja");
      ASSERT_FALSE(t.has_value()) << "compiled although jinja2 rejects it: " << s["error"]["message"];
      EXPECT_EQ(t.status().message().rfind("chat template snip.jinja: line ", 0), 0u) << t.status().message();
      ++compile_errors;
      continue;
    }
    auto out = render_snippet(text, s["vars"]);
    if (s.contains("expected")) {
      ASSERT_TRUE(out.has_value()) << out.status().message();
      EXPECT_EQ(*out, s["expected"].get<std::string>());
      ++rendered;
    } else {
      ++raised;
      ASSERT_FALSE(out.has_value()) << "rendered although jinja2 raised " << s["error"]["type"] << " ("
                                    << s["error"]["message"] << "): " << *out;
      if (s["error"]["type"] == "TemplateError") {
        EXPECT_NE(out.status().message().find(s["error"]["message"].get<std::string>()), std::string::npos)
            << out.status().message();
      }
    }
  }
  EXPECT_GE(compile_errors, 15);
  EXPECT_GE(rendered, 80);
  EXPECT_GE(raised, 25);
}

// The struct API builds the same messages as the JSON one.
TEST(ChatTemplateFixtures, ChatMessageStructsMatchJson) {
  int checked = 0;
  for (const auto& c : fixtures()["cases"]) {
    if (!c.contains("expected") || !c["tools"].is_null()) continue;
    std::vector<ChatMessage> messages;
    bool plain = true;
    for (const auto& m : c["messages"]) {
      ChatMessage cm;
      for (const auto& [k, v] : m.items()) {
        if (!v.is_string()) plain = false;
        if (!plain) break;
        if (k == "role") {
          cm.role = v;
        } else if (k == "content") {
          cm.content = v.get<std::string>();
        } else {
          cm.fields.emplace_back(k, v.get<std::string>());
        }
      }
      messages.push_back(std::move(cm));
    }
    if (!plain) continue;
    SCOPED_TRACE(c["name"].get<std::string>());
    ChatTemplate t = compile_ok(fixtures()["templates"][c["template"].get<std::string>()].get<std::string>());
    ChatRenderOptions o;
    o.add_generation_prompt = c["add_generation_prompt"].get<bool>();
    o.extra_vars = c["vars"];
    o.now = tm_of(c["now"]);
    auto out = t.render(messages, o);
    ASSERT_TRUE(out.has_value()) << out.status().message();
    EXPECT_EQ(*out, c["expected"].get<std::string>());
    ++checked;
  }
  EXPECT_GE(checked, 100);
}

// bos_token/eos_token options override the template's special tokens; other vars stay.
TEST(ChatTemplateFixtures, TokenOptionsOverrideSpecialTokens) {
  ChatTemplate t = compile_ok("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}");
  t.set_special_tokens({{"bos_token", "<B>"}, {"eos_token", "<E>"}, {"pad_token", "<P>"}});
  ChatRenderOptions o;
  EXPECT_EQ(*t.render({{"user", "x"}}, o), "<B>|<E>|<P>|False");
  o.bos_token = "<s>";
  EXPECT_EQ(*t.render({{"user", "x"}}, o), "<s>|<E>|<P>|False");
  o.extra_vars["eos_token"] = "</s>";
  EXPECT_EQ(*t.render({{"user", "x"}}, o), "<s>|</s>|<P>|False");
}

// --- compile-time errors ------------------------------------------------------------------------

TEST(ChatTemplateErrors, UnsupportedConstructsFailAtCompileTimeWithTheLine) {
  expect_compile_error("a\nb\n{% include 'other.jinja' %}", 3, "'{% include %}'");
  expect_compile_error("{% extends 'base.jinja' %}", 1, "'{% extends %}'");
  expect_compile_error("\n{% import 'm.jinja' as m %}", 2, "'{% import %}'");
  expect_compile_error("\n\n{% from 'm.jinja' import x %}", 3, "'{% from %}'");
  expect_compile_error("{% block body %}{% endblock %}", 1, "'{% block %}'");
  expect_compile_error("{% macro m() %}{{ caller() }}{% endmacro %}\n{% call m() %}x{% endcall %}", 2, "'{% call %}'");
  expect_compile_error("{{ x }}\n{{ y | wordwrap(10) }}", 2, "filter 'wordwrap'");
  expect_compile_error("\n{{ y is frobnicated }}", 2, "test 'frobnicated'");
  expect_compile_error("{{ '{}'.format(1) }}", 1, "method 'format'");
  expect_compile_error("{% for m in messages %}\n{{ m.content.zfill(3) }}{% endfor %}", 2, "method 'zfill'");
  expect_compile_error("{{ [1].append(2) }}", 1, "method 'append'");
  expect_compile_error("\n\n\n{{ cycler('a', 'b') }}", 4, "unknown function 'cycler'");
  expect_compile_error("{% for x in xs recursive %}{{ loop(x) }}{% endfor %}", 1, "recursive");
  expect_compile_error("{{ f(*args) }}", 1, "*args");
  expect_compile_error("{% autoescape true %}{% endautoescape %}", 1, "autoescape");
}

TEST(ChatTemplateErrors, MalformedTemplatesFailAtCompileTime) {
  expect_compile_error("line one\n{% if x %}\nunclosed", 2, "never closed");
  expect_compile_error("{% for m in messages %}\n{{ m }}\n", 1, "never closed");
  expect_compile_error("ok\n{{ x ", 2, "never closed");
  expect_compile_error("ok\nok\n{% if x ", 3, "never closed");
  expect_compile_error("{# a comment", 1, "comment");
  expect_compile_error("\n{{ 'unterminated }}", 2, "unterminated string");
  expect_compile_error("{{ (1 + 2 }}", 1, "expected ')'");
  expect_compile_error("x\n{% endfor %}", 2, "unknown tag 'endfor'");
  expect_compile_error("{% frobnicate %}", 1, "unknown tag");
  expect_compile_error("{{ 1 + }}", 1, "syntax error");
  expect_compile_error("{% raw %}never ends", 1, "raw");
  expect_compile_error("{{ 99999999999999999999 }}", 1, "64-bit");
  expect_compile_error("{{ x @ y }}", 1, "unexpected char '@'");
  expect_compile_error("{% set x = 1 %}\n{% continue %}", 2, "outside loop");
}

// --- hostile templates: errors, not crashes or hangs --------------------------------------------

TEST(ChatTemplateErrors, DeepSyntaxIsRejected) {
  expect_compile_error("{{ " + std::string(20000, '(') + "1" + std::string(20000, ')') + " }}", 1, "nested");
  expect_compile_error("{{ " + std::string(20000, '[') + std::string(20000, ']') + " }}", 1, "nested");
  expect_compile_error("{{ " + std::string(50000, '-') + "1 }}", 1, "nested");
  std::string nots;
  for (int i = 0; i < 20000; ++i) nots += "not ";
  expect_compile_error("{{ " + nots + "x }}", 1, "nested");
  std::string sum = "1";
  for (int i = 0; i < 50000; ++i) sum += " + 1";
  expect_compile_error("{{ " + sum + " }}", 1, "nested");
  std::string filters = "x";
  for (int i = 0; i < 50000; ++i) filters += " | trim";
  expect_compile_error("{{ " + filters + " }}", 1, "nested");
  std::string ifs;
  for (int i = 0; i < 5000; ++i) ifs += "{% if x %}";
  expect_compile_error(ifs, 1, "nested");
  std::string conds = "1";
  for (int i = 0; i < 20000; ++i) conds += " if x else 1";
  expect_compile_error("{{ " + conds + " }}", 1, "nested");
}

// Renders a template expected to fail; the limits are lowered so that the test stays fast (the
// defaults are 32 MiB and 20M steps).
Status render_error(const std::string& text) {
  auto t = ChatTemplate::compile(text, "hostile.jinja");
  if (!t.has_value()) return t.status();
  ChatRenderOptions o;
  o.max_output_bytes = size_t{1} << 20;
  o.max_steps = 1'000'000;
  auto out = t->render({{"user", "hi"}}, o);
  EXPECT_FALSE(out.has_value()) << "rendered " << (out.has_value() ? out->size() : 0) << " bytes: " << text;
  return out.status();
}

TEST(ChatTemplateErrors, RunawayRenderingIsBounded) {
  // Work: 10^10 iterations would take hours; the step budget stops it, naming where.
  Status s = render_error("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.message();
  EXPECT_NE(s.message().find("hostile.jinja: line 1"), std::string::npos) << s.message();
  // Output and intermediate strings.
  s = render_error("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.message();
  s = render_error("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.message();
  s = render_error("{{ 'x' * 9223372036854775807 }}");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.message();
  s = render_error("{{ [1, 2] * 4000000000 }}");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.message();
  s = render_error("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}");
  EXPECT_FALSE(s.is_ok());
  // Recursion through macros.
  s = render_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_NE(s.message().find("nested deeper"), std::string::npos) << s.message();
  // Values nested one level per iteration, then printed, serialised and compared.
  const std::string deep = "{% set ns = namespace(x=[]) %}{% for i in range(5000) %}{% set ns.x = [ns.x] %}{% endfor %}";
  EXPECT_NE(render_error(deep + "{{ ns.x }}").message().find("nested deeper"), std::string::npos);
  EXPECT_NE(render_error(deep + "{{ ns.x | tojson }}").message().find("nested deeper"), std::string::npos);
  EXPECT_NE(render_error(deep + "{{ ns.x == ns.x }}").message().find("nested deeper"), std::string::npos);
  // A namespace that contains itself.
  EXPECT_FALSE(render_error("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}").is_ok());
  // Integer overflow is an error, not UB.
  EXPECT_FALSE(render_error("{{ 9223372036854775807 + 1 }}").is_ok());
  EXPECT_FALSE(render_error("{{ 2 ** 64 }}").is_ok());
  EXPECT_FALSE(render_error("{{ -9223372036854775807 - 1 - 1 }}").is_ok());
  EXPECT_FALSE(render_error("{{ (-9223372036854775807 - 1) // -1 }}").is_ok());
}

TEST(ChatTemplateErrors, EmptyConversationAndBadInput) {
  ChatTemplate t = compile_ok("{{ messages | length }}");
  ChatRenderOptions o;
  EXPECT_FALSE(t.render({}, o).has_value());
  EXPECT_FALSE(t.render_json(ojson::object(), o).has_value());
  EXPECT_FALSE(t.render_json(ojson::array({1}), o).has_value());
  o.extra_vars["messages"] = ojson::array();
  EXPECT_FALSE(t.render({{"user", "x"}}, o).has_value());
}

// Python's json.dumps and dict semantics on caller data: None-valued keys are dropped from
// messages, key order is kept, reasoning fields are aliased as transformers does.
TEST(ChatTemplateFixtures, MessageNormalisation) {
  ChatTemplate t = compile_ok("{{ messages[0] | tojson }}|{{ messages[0].content is defined }}");
  ChatRenderOptions o;
  ojson m = ojson::array({{{"role", "assistant"}, {"content", nullptr}, {"z", 1}, {"reasoning", "r"}}});
  auto out = t.render_json(m, o);
  ASSERT_TRUE(out.has_value()) << out.status().message();
  EXPECT_EQ(*out, R"({"thinking": "r", "role": "assistant", "z": 1, "reasoning": "r", "reasoning_content": "r"}|False)");
}

TEST(ChatTemplateFixtures, RenderingIsThreadSafe) {
  const ojson& c = fixtures()["cases"][0];
  ChatTemplate t = compile_ok(fixtures()["templates"][c["template"].get<std::string>()].get<std::string>());
  ChatRenderOptions o;
  o.add_generation_prompt = c["add_generation_prompt"].get<bool>();
  o.extra_vars = c["vars"];
  std::vector<std::string> outs(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int k = 0; k < 50; ++k) {
        auto r = t.render_json(c["messages"], o);
        outs[i] = r.has_value() ? *r : r.status().message();
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const auto& s : outs) EXPECT_EQ(s, c["expected"].get<std::string>());
}

// --- loading from a checkpoint folder ------------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("adakv_chat_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
  }
  std::string str() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

const ojson& case_named(const std::string& name) {
  for (const auto& c : fixtures()["cases"]) {
    if (c["name"] == name) return c;
  }
  ADD_FAILURE() << "no fixture case " << name;
  static const ojson empty;
  return empty;
}

TEST(ChatTemplateLoad, ProjectModelRendersLikeTransformers) {
  auto t = load_chat_template(std::string(ADAKV_SOURCE_DIR) + "/models/adakv-tiny-v1");
  ASSERT_TRUE(t.has_value()) << t.status().message();
  EXPECT_NE(t->source().find("tokenizer_config.json"), std::string::npos);
  int checked = 0;
  for (const auto& c : fixtures()["cases"]) {
    if (c["template"] != "adakv_tiny_v1" || !c.contains("expected")) continue;
    SCOPED_TRACE(c["name"].get<std::string>());
    ChatRenderOptions o;  // special tokens come from the folder this time
    o.add_generation_prompt = c["add_generation_prompt"].get<bool>();
    auto out = t->render_json(c["messages"], o);
    ASSERT_TRUE(out.has_value()) << out.status().message();
    EXPECT_EQ(*out, c["expected"].get<std::string>());
    ++checked;
  }
  EXPECT_GE(checked, 10);
}

TEST(ChatTemplateLoad, JinjaFileListFormAndSpecialTokens) {
  const ojson& c = case_named("llama3_instruct/multi_turn/gen");
  const std::string llama3 = fixtures()["templates"]["llama3_instruct"];
  ChatRenderOptions o;
  o.add_generation_prompt = true;

  // chat_template.jinja wins over tokenizer_config.json (transformers 5 layout); AddedToken-style
  // special tokens are read by their content.
  TempDir a;
  a.write("chat_template.jinja", llama3 + "\n");  // jinja2 drops one trailing newline
  a.write("tokenizer_config.json", R"({"chat_template": "WRONG", "bos_token": {"content": "<|begin_of_text|>",
      "__type": "AddedToken"}, "eos_token": "<|eot_id|>"})");
  auto t = load_chat_template(a.str());
  ASSERT_TRUE(t.has_value()) << t.status().message();
  EXPECT_NE(t->source().find("chat_template.jinja"), std::string::npos);
  EXPECT_EQ(*t->render_json(c["messages"], o), c["expected"].get<std::string>());

  // The list-of-named-templates form: "default" is used.
  TempDir b;
  ojson config = {{"bos_token", "<|begin_of_text|>"},
                  {"chat_template", ojson::array({{{"name", "tool_use"}, {"template", "TOOLS"}},
                                                  {{"name", "default"}, {"template", llama3}}})}};
  b.write("tokenizer_config.json", config.dump());
  t = load_chat_template(b.str());
  ASSERT_TRUE(t.has_value()) << t.status().message();
  EXPECT_EQ(*t->render_json(c["messages"], o), c["expected"].get<std::string>());

  // Legacy special_tokens_map.json fills tokens missing from tokenizer_config.json.
  TempDir d;
  d.write("tokenizer_config.json", R"({"chat_template": "{{ bos_token }}{{ eos_token }}"})");
  d.write("special_tokens_map.json", R"({"bos_token": {"content": "<s>"}, "eos_token": "</s>"})");
  t = load_chat_template(d.str());
  ASSERT_TRUE(t.has_value()) << t.status().message();
  EXPECT_EQ(*t->render({{"user", "x"}}, ChatRenderOptions()), "<s></s>");
}

TEST(ChatTemplateLoad, MissingOrBrokenTemplatesAreErrors) {
  TempDir none;
  none.write("tokenizer_config.json", R"({"bos_token": "<s>"})");
  auto t = load_chat_template(none.str());
  ASSERT_FALSE(t.has_value());
  EXPECT_EQ(t.status().code(), StatusCode::kNotFound);
  EXPECT_NE(t.status().message().find("no chat template"), std::string::npos) << t.status().message();

  TempDir empty;
  EXPECT_FALSE(load_chat_template(empty.str()).has_value());

  TempDir no_default;
  no_default.write("tokenizer_config.json", R"({"chat_template": [{"name": "rag", "template": "x"}]})");
  t = load_chat_template(no_default.str());
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.status().message().find("rag"), std::string::npos) << t.status().message();

  TempDir bad_json;
  bad_json.write("tokenizer_config.json", "{\"chat_template\": ");
  t = load_chat_template(bad_json.str());
  ASSERT_FALSE(t.has_value());
  EXPECT_NE(t.status().message().find("tokenizer_config.json"), std::string::npos) << t.status().message();

  TempDir unsupported;
  unsupported.write("tokenizer_config.json", R"({"chat_template": "{% for m in messages %}\n{% include 'x' %}{% endfor %}"})");
  t = load_chat_template(unsupported.str());
  ASSERT_FALSE(t.has_value());
  const std::string& m = t.status().message();
  EXPECT_NE(m.find("tokenizer_config.json: line 2: unsupported"), std::string::npos) << m;
}

}  // namespace
}  // namespace adakv
