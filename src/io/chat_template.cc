#include "io/chat_template.h"

#include <filesystem>

#include "core/mapped_file.h"
#include "io/jinja_ast.h"
#include "io/jinja_interp.h"
#include "io/jinja_lexer.h"
#include "io/jinja_parser.h"

namespace adakv {
namespace {

using jinja::Value;
using ojson = nlohmann::ordered_json;

Expected<Value> from_json(const ojson& j, int depth) {
  if (depth > jinja::kMaxValueDepth) {
    return invalid_argument("JSON nested deeper than " + std::to_string(jinja::kMaxValueDepth) + " levels");
  }
  switch (j.type()) {
    case ojson::value_t::null: return Value::none();
    case ojson::value_t::boolean: return Value::boolean(j.get<bool>());
    case ojson::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case ojson::value_t::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return Value::number(static_cast<double>(u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case ojson::value_t::number_float: return Value::number(j.get<double>());
    case ojson::value_t::string: return Value::string(j.get<std::string>());
    case ojson::value_t::array: {
      jinja::ValueList items;
      items.reserve(j.size());
      for (const auto& e : j) {
        ADAKV_ASSIGN_OR_RETURN(Value v, from_json(e, depth + 1));
        items.push_back(std::move(v));
      }
      return Value::list(std::move(items));
    }
    case ojson::value_t::object: {
      Value::Dict d;
      d.entries.reserve(j.size());
      for (const auto& [k, e] : j.items()) {
        ADAKV_ASSIGN_OR_RETURN(Value v, from_json(e, depth + 1));
        d.entries.emplace_back(Value::string(k), std::move(v));
      }
      return Value::dict(std::move(d));
    }
    default: return invalid_argument("unsupported JSON value (binary or discarded)");
  }
}

// One message as transformers hands it to the template: keys whose value is None dropped, then
// the reasoning aliases: {"thinking": r, **message, "reasoning_content": r} when any of
// reasoning_content / thinking / reasoning is set (first non-None of those, in that order).
Expected<Value> normalize_message(const ojson& m, size_t index) {
  if (!m.is_object()) {
    return invalid_argument("chat message " + std::to_string(index) + " is not a JSON object");
  }
  Value::Dict d;
  for (const auto& [k, e] : m.items()) {
    if (e.is_null()) continue;
    ADAKV_ASSIGN_OR_RETURN(Value v, from_json(e, 1));
    d.entries.emplace_back(Value::string(k), std::move(v));
  }
  for (const char* field : {"reasoning_content", "thinking", "reasoning"}) {
    const Value* r = d.find(std::string_view(field));
    if (r == nullptr) continue;
    Value reasoning = *r;
    Value::Dict aliased;
    aliased.entries.emplace_back(Value::string("thinking"), reasoning);
    for (auto& [k, v] : d.entries) aliased.set(k, v);
    aliased.set(Value::string("reasoning_content"), reasoning);
    d = std::move(aliased);
    break;
  }
  return Value::dict(std::move(d));
}

// A special token in tokenizer_config.json: "<s>" or {"content": "<s>", ...} (AddedToken).
std::optional<std::string> token_text(const nlohmann::json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return std::nullopt;
}

Expected<nlohmann::json> read_json(const std::string& path) {
  ADAKV_ASSIGN_OR_RETURN(std::string text, read_text_file(path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return data_loss(path + ": not valid JSON");
  return j;
}

}  // namespace

Expected<ChatTemplate> ChatTemplate::compile(std::string_view text, std::string source) {
  auto tokens = jinja::tokenize(text);
  if (!tokens.has_value()) return tokens.status().with_context("chat template " + source);
  auto body = jinja::parse(std::move(tokens).value());
  if (!body.has_value()) return body.status().with_context("chat template " + source);
  auto program = std::make_shared<jinja::Program>();
  program->source = source;
  program->body = std::move(body).value();
  ChatTemplate t;
  t.program_ = std::move(program);
  t.source_ = std::move(source);
  t.text_ = std::string(text);
  return t;
}

Expected<std::string> ChatTemplate::render(const std::vector<ChatMessage>& messages,
                                           const ChatRenderOptions& options) const {
  ojson list = ojson::array();
  for (const auto& m : messages) {
    ojson o = ojson::object();
    o["role"] = m.role;
    if (m.content) o["content"] = *m.content;
    for (const auto& [k, v] : m.fields) o[k] = v;
    list.push_back(std::move(o));
  }
  return render_json(list, options);
}

Expected<std::string> ChatTemplate::render_json(const ojson& messages, const ChatRenderOptions& options) const {
  const std::string where = "chat template " + source_;
  if (!messages.is_array()) return invalid_argument(where + ": messages must be a JSON array");
  if (messages.empty()) return invalid_argument(where + ": cannot apply the chat template to an empty conversation");
  if (!options.extra_vars.is_object()) return invalid_argument(where + ": extra_vars must be a JSON object");

  // The render context, in the order transformers builds it: messages, tools, documents,
  // add_generation_prompt, then {**special_tokens_map, **kwargs}.
  Value::Dict context;
  jinja::ValueList list;
  list.reserve(messages.size());
  for (size_t i = 0; i < messages.size(); ++i) {
    auto m = normalize_message(messages[i], i);
    if (!m.has_value()) return m.status().with_context(where);
    list.push_back(std::move(m).value());
  }
  context.set(Value::string("messages"), Value::list(std::move(list)));
  for (const auto& [name, j] : {std::pair<const char*, const ojson*>{"tools", &options.tools},
                                {"documents", &options.documents}}) {
    auto v = from_json(*j, 0);
    if (!v.has_value()) return v.status().with_context(where + ": " + name);
    context.set(Value::string(name), std::move(v).value());
  }
  context.set(Value::string("add_generation_prompt"), Value::boolean(options.add_generation_prompt));
  for (const auto& [name, token] : special_tokens_) context.set(Value::string(name), Value::string(token));
  if (options.bos_token) context.set(Value::string("bos_token"), Value::string(*options.bos_token));
  if (options.eos_token) context.set(Value::string("eos_token"), Value::string(*options.eos_token));
  for (const auto& [name, j] : options.extra_vars.items()) {
    if (name == "messages" || name == "tools" || name == "documents" || name == "add_generation_prompt") {
      return invalid_argument(where + ": extra_vars may not set '" + name + "' (it has its own option)");
    }
    auto v = from_json(j, 0);
    if (!v.has_value()) return v.status().with_context(where + ": " + name);
    context.set(Value::string(name), std::move(v).value());
  }

  std::optional<std::tm> now;
  if (options.now) {
    // Normalise the calendar fields and fill in the weekday and day of the year (%a, %j).
    std::tm t = *options.now;
    t.tm_isdst = 0;
    std::time_t secs = timegm(&t);
    std::tm norm{};
    gmtime_r(&secs, &norm);
    now = norm;
  }
  jinja::RenderLimits limits;
  limits.max_output_bytes = options.max_output_bytes;
  limits.max_steps = options.max_steps;
  jinja::Interpreter interp(*program_, context, limits, now);
  auto out = interp.render();
  if (!out.has_value()) return out.status().with_context(where);
  return out;
}

Expected<ChatTemplate> load_chat_template(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const std::string config_path = (fs::path(model_dir) / "tokenizer_config.json").string();
  const std::string jinja_path = (fs::path(model_dir) / "chat_template.jinja").string();
  std::error_code ec;
  const bool have_config = fs::exists(config_path, ec);
  const bool have_jinja = fs::exists(jinja_path, ec);

  nlohmann::json config = nlohmann::json::object();
  if (have_config) {
    ADAKV_ASSIGN_OR_RETURN(config, read_json(config_path));
    if (!config.is_object()) return data_loss(config_path + ": not a JSON object");
  }

  std::string text;
  std::string source;
  if (have_jinja) {
    ADAKV_ASSIGN_OR_RETURN(text, read_text_file(jinja_path));
    source = jinja_path;
  } else if (config.contains("chat_template") && !config["chat_template"].is_null()) {
    const auto& ct = config["chat_template"];
    source = config_path;
    if (ct.is_string()) {
      text = ct.get<std::string>();
    } else if (ct.is_array()) {
      std::string names;
      bool found = false;
      for (const auto& entry : ct) {
        if (!entry.is_object() || !entry.contains("name") || !entry["name"].is_string() || !entry.contains("template") ||
            !entry["template"].is_string()) {
          return data_loss(config_path + ": chat_template list entries must be {\"name\", \"template\"} strings");
        }
        names += (names.empty() ? "" : ", ") + entry["name"].get<std::string>();
        if (entry["name"] == "default") {
          text = entry["template"].get<std::string>();
          found = true;
        }
      }
      if (!found) {
        return not_found(config_path + ": chat_template lists several templates (" + names + ") and none is named \"default\"");
      }
      source += " (chat_template \"default\")";
    } else {
      return data_loss(config_path + ": chat_template must be a string or a list of named templates");
    }
  } else {
    return not_found(model_dir + ": no chat template (neither chat_template.jinja nor a \"chat_template\" in tokenizer_config.json)");
  }

  ADAKV_ASSIGN_OR_RETURN(ChatTemplate tmpl, ChatTemplate::compile(text, source));

  // Special tokens, as transformers' special_tokens_map exposes them to the template.
  nlohmann::json legacy = nlohmann::json::object();
  const std::string legacy_path = (fs::path(model_dir) / "special_tokens_map.json").string();
  if (fs::exists(legacy_path, ec)) {
    auto j = read_json(legacy_path);
    if (j.has_value() && j->is_object()) legacy = std::move(j).value();
  }
  std::vector<std::pair<std::string, std::string>> tokens;
  for (const char* name : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    std::optional<std::string> text_of;
    if (config.contains(name)) text_of = token_text(config[name]);
    if (!text_of && legacy.contains(name)) text_of = token_text(legacy[name]);
    if (text_of) tokens.emplace_back(name, *text_of);
  }
  tmpl.set_special_tokens(std::move(tokens));
  return tmpl;
}

}  // namespace adakv
