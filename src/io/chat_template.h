// The chat template of a Hugging Face checkpoint, rendered in C++ the way transformers'
// apply_chat_template(..., tokenize=False) renders it: jinja2 with trim_blocks and lstrip_blocks,
// messages with None-valued keys dropped, reasoning fields aliased, `tools`/`documents` None when
// absent, the tokenizer's special tokens (bos_token, eos_token, ...) as variables, and
// raise_exception / strftime_now / namespace as globals.
//
// Compile once at start-up: a template this renderer cannot handle (syntax error, unsupported
// tag, unknown filter/test/method/function) fails there, naming the source and line. Rendering
// is then thread-safe on a shared ChatTemplate and bounded in output size and work.
//
//   ADAKV_ASSIGN_OR_RETURN(ChatTemplate tmpl, load_chat_template(model_dir));
//   ChatRenderOptions opt;
//   opt.add_generation_prompt = true;
//   ADAKV_ASSIGN_OR_RETURN(std::string prompt, tmpl.render({{"user", "Hello!"}}, opt));
#pragma once

#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"

namespace adakv {

namespace jinja {
struct Program;
}

struct ChatMessage {
  std::string role;
  // nullopt leaves the key out (transformers drops None-valued keys before rendering).
  std::optional<std::string> content;
  // Further string fields a template may read ("name", "reasoning_content", "tool_call_id").
  std::vector<std::pair<std::string, std::string>> fields;

  ChatMessage() = default;
  ChatMessage(std::string r, std::string c) : role(std::move(r)), content(std::move(c)) {}
};

struct ChatRenderOptions {
  bool add_generation_prompt = false;
  // Override the special tokens read with the template (tokenizer_config.json); nullopt keeps
  // them. A token the tokenizer does not define is undefined in the template unless set here.
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  // More variables, as apply_chat_template(**kwargs) passes them, e.g.
  // {"enable_thinking": false, "date_string": "26 Jul 2024"}; JSON types keep their template
  // types (false stays falsy). They override the special tokens. `messages`, `tools`,
  // `documents` and `add_generation_prompt` are set by the fields of this struct instead.
  nlohmann::ordered_json extra_vars = nlohmann::ordered_json::object();
  // OpenAI-style tool schemas (a JSON array) and RAG documents; null: the template sees None.
  nlohmann::ordered_json tools = nullptr;
  nlohmann::ordered_json documents = nullptr;
  // The time strftime_now() reports (Llama 3.2's "Today Date"); unset reads the local clock.
  // Only the calendar fields (year, mon, mday, hour, min, sec) are read.
  std::optional<std::tm> now;
  // Bounds on one render: output bytes (and any string built on the way), evaluation steps.
  size_t max_output_bytes = size_t{32} << 20;
  int64_t max_steps = 20'000'000;
};

class ChatTemplate {
 public:
  // Parses `text`; `source` names it in every error ("models/x/tokenizer_config.json").
  static Expected<ChatTemplate> compile(std::string_view text, std::string source);

  // Messages as structs (role, content, string fields).
  Expected<std::string> render(const std::vector<ChatMessage>& messages, const ChatRenderOptions& options) const;
  // Messages as OpenAI-style JSON objects, for what structs cannot carry (tool_calls, content
  // parts). Key order is kept (ordered_json), as tojson prints it.
  Expected<std::string> render_json(const nlohmann::ordered_json& messages, const ChatRenderOptions& options) const;

  const std::string& source() const { return source_; }
  const std::string& text() const { return text_; }
  // Special tokens passed to the template as variables (bos_token, eos_token, unk_token, ...).
  const std::vector<std::pair<std::string, std::string>>& special_tokens() const { return special_tokens_; }
  void set_special_tokens(std::vector<std::pair<std::string, std::string>> tokens) { special_tokens_ = std::move(tokens); }

 private:
  std::shared_ptr<const jinja::Program> program_;
  std::string source_;
  std::string text_;
  std::vector<std::pair<std::string, std::string>> special_tokens_;
};

// The chat template of a checkpoint folder, as transformers loads it: chat_template.jinja when
// present (transformers 5 writes it), else tokenizer_config.json's "chat_template" (a string, or
// a list of {"name", "template"} of which "default" is used). Special tokens come from
// tokenizer_config.json (strings or AddedToken objects), then special_tokens_map.json.
// An error when there is no template or it does not compile.
Expected<ChatTemplate> load_chat_template(const std::string& model_dir);

}  // namespace adakv
