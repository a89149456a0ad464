#include "model/model_config.h"

#include <algorithm>
#include <climits>
#include <filesystem>
#include <optional>
#include <system_error>

#include <nlohmann/json.hpp>

#include "core/mapped_file.h"
#include "core/printable.h"

namespace adakv {
namespace {

using Json = nlohmann::json;

struct ArchInfo {
  const char* architecture;
  const char* model_type;
  ModelFamily family;
  int64_t default_max_positions;  // transformers' config-class default when the field is absent
};

constexpr ArchInfo kArchs[] = {
    {"LlamaForCausalLM", "llama", ModelFamily::kLlama, 2048},
    {"MistralForCausalLM", "mistral", ModelFamily::kMistral, 4096 * 32},
    {"Qwen2ForCausalLM", "qwen2", ModelFamily::kQwen2, 32768},
    {"Qwen3ForCausalLM", "qwen3", ModelFamily::kQwen3, 32768},
};

constexpr const char* kSupportedArchs = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM";

// Strings from config.json end up in messages: keep those on one line and of bounded length.
std::string printable(std::string_view s) { return adakv::printable(s, 100); }

// Typed access to the fields of one JSON object. Absent and null are the same ("not set")
// everywhere except where the caller asks `present` (a few fields default differently when
// absent than when null, as in transformers). Errors name the file and the dotted field path.
class Fields {
 public:
  Fields(const Json& obj, const std::string& source, std::string prefix = "")
      : obj_(obj), source_(source), prefix_(std::move(prefix)) {}

  bool present(const char* key) const { return obj_.contains(key); }
  bool set(const char* key) const {
    const auto it = obj_.find(key);
    return it != obj_.end() && !it->is_null();
  }
  const Json* raw(const char* key) const {
    const auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  std::string path(const char* key) const { return prefix_ + key; }

  Status missing(const char* key) const {
    return unimplemented(source_ + ": missing required field '" + path(key) + "'");
  }
  Status wrong_type(const char* key, const char* expected) const {
    const Json& v = obj_.at(key);
    std::string shown = v.dump();
    if (shown.size() > 40) shown = shown.substr(0, 40) + "...";
    return unimplemented(source_ + ": field '" + path(key) + "' must be " + expected + ", got " + v.type_name() +
                         " " + shown);
  }
  Status bad_value(const char* key, const std::string& why) const {
    return unimplemented(source_ + ": field '" + path(key) + "' " + why);
  }

  Expected<std::optional<int64_t>> opt_int(const char* key) const {
    const Json* v = raw(key);
    if (v == nullptr) return std::optional<int64_t>();
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return bad_value(key, "is out of range");
      return std::optional<int64_t>(static_cast<int64_t>(u));
    }
    if (v->is_number_integer()) return std::optional<int64_t>(v->get<int64_t>());
    return wrong_type(key, "an integer");
  }
  // A required integer >= `min`.
  Expected<int64_t> req_int(const char* key, int64_t min = 1) const {
    ADAKV_ASSIGN_OR_RETURN(const std::optional<int64_t> v, opt_int(key));
    if (!v) return missing(key);
    if (*v < min) return bad_value(key, "must be at least " + std::to_string(min) + ", got " + std::to_string(*v));
    return *v;
  }
  Expected<int64_t> int_or(const char* key, int64_t fallback, int64_t min = 1) const {
    if (!set(key)) return fallback;
    return req_int(key, min);
  }
  Expected<std::optional<double>> opt_double(const char* key) const {
    const Json* v = raw(key);
    if (v == nullptr) return std::optional<double>();
    if (!v->is_number()) return wrong_type(key, "a number");
    return std::optional<double>(v->get<double>());
  }
  Expected<double> req_double(const char* key) const {
    ADAKV_ASSIGN_OR_RETURN(const std::optional<double> v, opt_double(key));
    if (!v) return missing(key);
    return *v;
  }
  Expected<bool> bool_or(const char* key, bool fallback) const {
    const Json* v = raw(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) return wrong_type(key, "a boolean");
    return v->get<bool>();
  }
  Expected<std::optional<std::string>> opt_string(const char* key) const {
    const Json* v = raw(key);
    if (v == nullptr) return std::optional<std::string>();
    if (!v->is_string()) return wrong_type(key, "a string");
    return std::optional<std::string>(v->get<std::string>());
  }
  // A token id or a list of them (eos_token_id); appended to `out` without duplicates.
  Status append_token_ids(const char* key, std::vector<int32_t>* out) const {
    const Json* v = raw(key);
    if (v == nullptr) return Status::ok();
    std::vector<const Json*> items;
    if (v->is_array()) {
      for (const Json& e : *v) items.push_back(&e);
    } else {
      items.push_back(v);
    }
    for (const Json* e : items) {
      if (!e->is_number_integer()) return wrong_type(key, "a token id or a list of token ids");
      int64_t id = -1;  // stays -1 for unsigned values too large for int64
      if (!e->is_number_unsigned()) {
        id = e->get<int64_t>();
      } else if (e->get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX)) {
        id = static_cast<int64_t>(e->get<uint64_t>());
      }
      if (id < 0 || id > INT32_MAX) return bad_value(key, "holds " + e->dump() + ", not a token id");
      if (std::find(out->begin(), out->end(), id) == out->end()) out->push_back(static_cast<int32_t>(id));
    }
    return Status::ok();
  }
  Expected<std::optional<int32_t>> opt_token_id(const char* key) const {
    ADAKV_ASSIGN_OR_RETURN(const std::optional<int64_t> v, opt_int(key));
    if (!v) return std::optional<int32_t>();
    if (*v < 0 || *v > INT32_MAX) return bad_value(key, "holds " + std::to_string(*v) + ", not a token id");
    return std::optional<int32_t>(static_cast<int32_t>(*v));
  }

 private:
  const Json& obj_;
  const std::string& source_;
  std::string prefix_;
};

Expected<Json> parse_json_object(const std::string& text, const std::string& source) {
  Json root;
  try {
    root = Json::parse(text);
  } catch (const Json::exception& e) {
    return data_loss(source + ": malformed JSON: " + e.what());
  }
  if (!root.is_object()) return data_loss(source + ": not a JSON object (a " + std::string(root.type_name()) + ")");
  return root;
}

Expected<const ArchInfo*> find_architecture(const Fields& f, const Json& root, const std::string& source) {
  if (f.set("architectures")) {
    const Json& archs = root.at("architectures");
    if (!archs.is_array() || (!archs.empty() && !archs[0].is_string())) {
      return f.wrong_type("architectures", "a list of class names");
    }
    if (!archs.empty()) {
      const std::string& name = archs[0].get_ref<const std::string&>();
      for (const ArchInfo& a : kArchs) {
        if (name == a.architecture) return &a;
      }
      return unimplemented(source + ": field 'architectures' names unsupported architecture '" + printable(name) +
                           "' (supported: " + kSupportedArchs + ")");
    }
  }
  ADAKV_ASSIGN_OR_RETURN(const std::optional<std::string> model_type, f.opt_string("model_type"));
  if (!model_type) {
    return unimplemented(source + ": missing required field 'architectures' (or 'model_type'); supported: " +
                         kSupportedArchs);
  }
  for (const ArchInfo& a : kArchs) {
    if (*model_type == a.model_type) return &a;
  }
  return unimplemented(source + ": field 'model_type' names unsupported model type '" + printable(*model_type) +
                       "' (supported: llama, mistral, qwen2, qwen3)");
}

// RoPE from either form. transformers 4.x: top-level rope_theta plus rope_scaling {rope_type|type,
// factor, ...}; 5.x: rope_parameters {rope_theta, rope_type, factor, ...}. As in transformers'
// convert_rope_params_to_dict, rope_scaling wins over rope_parameters, and a theta inside the dict
// wins over the top-level one.
Status parse_rope(const Fields& f, const Json& root, const std::string& source, ModelConfig* cfg) {
  const char* dict_key = nullptr;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (!f.set(key)) continue;
    if (!root.at(key).is_object()) return f.wrong_type(key, "an object");
    if (!root.at(key).empty()) {
      dict_key = key;
      break;
    }
  }
  ADAKV_ASSIGN_OR_RETURN(const std::optional<double> top_theta, f.opt_double("rope_theta"));
  ADAKV_ASSIGN_OR_RETURN(const std::optional<double> top_partial, f.opt_double("partial_rotary_factor"));
  if (top_partial && *top_partial != 1.0) {
    return f.bad_value("partial_rotary_factor", "is " + std::to_string(*top_partial) + ": partial RoPE not supported");
  }
  cfg->rope_theta = top_theta.value_or(10000.0);
  cfg->rope_scaling = RopeScaling{};
  if (dict_key == nullptr) return Status::ok();

  const Json& dict = root.at(dict_key);
  const Fields r(dict, source, std::string(dict_key) + ".");
  for (const char* layer_type : {"full_attention", "sliding_attention"}) {
    if (dict.contains(layer_type)) {
      return unimplemented(source + ": field '" + dict_key + "' holds per-layer-type RoPE parameters: not supported");
    }
  }
  ADAKV_ASSIGN_OR_RETURN(const std::optional<double> theta, r.opt_double("rope_theta"));
  if (theta) cfg->rope_theta = *theta;
  if (!(cfg->rope_theta > 0)) return r.bad_value("rope_theta", "must be positive");
  ADAKV_ASSIGN_OR_RETURN(const std::optional<double> partial, r.opt_double("partial_rotary_factor"));
  if (partial && *partial != 1.0) {
    return r.bad_value("partial_rotary_factor", "is " + std::to_string(*partial) + ": partial RoPE not supported");
  }

  const char* type_key = r.set("rope_type") ? "rope_type" : "type";
  ADAKV_ASSIGN_OR_RETURN(const std::optional<std::string> type, r.opt_string(type_key));
  const std::string rope_type = type.value_or("default");
  if (rope_type == "default") return Status::ok();
  if (rope_type != "linear" && rope_type != "llama3") {
    return unimplemented(source + ": field '" + r.path(type_key) + "' is '" + printable(rope_type) +
                         "': not supported (supported: default, linear, llama3)");
  }
  RopeScaling& s = cfg->rope_scaling;
  ADAKV_ASSIGN_OR_RETURN(s.factor, r.req_double("factor"));
  if (!(s.factor > 0)) return r.bad_value("factor", "must be positive");
  if (rope_type == "linear") {
    s.type = RopeScalingType::kLinear;
    return Status::ok();
  }
  s.type = RopeScalingType::kLlama3;
  ADAKV_ASSIGN_OR_RETURN(s.low_freq_factor, r.req_double("low_freq_factor"));
  ADAKV_ASSIGN_OR_RETURN(s.high_freq_factor, r.req_double("high_freq_factor"));
  if (!(s.low_freq_factor > 0) || !(s.high_freq_factor > s.low_freq_factor)) {
    return r.bad_value("high_freq_factor", "must exceed low_freq_factor, and both must be positive");
  }
  // transformers' standardize_rope_params: a top-level original_max_position_embeddings wins,
  // then the dict's, then max_position_embeddings.
  if (f.set("original_max_position_embeddings")) {
    ADAKV_ASSIGN_OR_RETURN(s.original_max_position_embeddings, f.req_int("original_max_position_embeddings"));
  } else {
    ADAKV_ASSIGN_OR_RETURN(s.original_max_position_embeddings,
                           r.int_or("original_max_position_embeddings", cfg->max_position_embeddings));
  }
  return Status::ok();
}

Status parse_sliding_window(const Fields& f, const Json& root, ModelConfig* cfg) {
  cfg->sliding_window = 0;
  if (cfg->family == ModelFamily::kMistral) {
    // MistralConfig defaults to 4096 when the key is absent; null turns it off.
    if (!f.present("sliding_window")) {
      cfg->sliding_window = 4096;
      return Status::ok();
    }
    ADAKV_ASSIGN_OR_RETURN(cfg->sliding_window, f.int_or("sliding_window", 0));
    return Status::ok();
  }
  if (cfg->family != ModelFamily::kQwen2 && cfg->family != ModelFamily::kQwen3) return Status::ok();
  // Qwen2/3 slide only with use_sliding_window, and then only layers listed as sliding in
  // layer_types (5.x) or at index >= max_window_layers (4.x). One sliding layer is enough for the
  // whole model to be limited to the window: contexts beyond it are refused.
  ADAKV_ASSIGN_OR_RETURN(const bool use, f.bool_or("use_sliding_window", false));
  if (!use) return Status::ok();
  if (f.present("sliding_window") && !f.set("sliding_window")) return Status::ok();
  ADAKV_ASSIGN_OR_RETURN(const int64_t window, f.int_or("sliding_window", 4096));
  bool any_sliding = false;
  if (f.set("layer_types")) {
    const Json& types = root.at("layer_types");
    if (!types.is_array()) return f.wrong_type("layer_types", "a list of strings");
    for (const Json& t : types) {
      if (!t.is_string()) return f.wrong_type("layer_types", "a list of strings");
      any_sliding = any_sliding || t.get_ref<const std::string&>() == "sliding_attention";
    }
  } else {
    ADAKV_ASSIGN_OR_RETURN(const int64_t max_window_layers, f.int_or("max_window_layers", 28, 0));
    any_sliding = max_window_layers < cfg->num_layers;
  }
  if (any_sliding) cfg->sliding_window = window;
  return Status::ok();
}

Status parse_dtype(const Fields& f, ModelConfig* cfg) {
  const char* key = f.set("dtype") ? "dtype" : "torch_dtype";
  ADAKV_ASSIGN_OR_RETURN(const std::optional<std::string> name, f.opt_string(key));
  if (!name) return Status::ok();
  if (*name == "bfloat16") {
    cfg->dtype = DType::kBF16;
  } else if (*name == "float16") {
    cfg->dtype = DType::kF16;
  } else if (*name == "float32") {
    cfg->dtype = DType::kF32;
  } else {
    return f.bad_value(key, "is '" + printable(*name) + "': not supported (supported: bfloat16, float16, float32)");
  }
  return Status::ok();
}

}  // namespace

Expected<ModelConfig> parse_model_config(const std::string& json_text, const std::string& source) {
  ADAKV_ASSIGN_OR_RETURN(const Json root, parse_json_object(json_text, source));
  const Fields f(root, source);
  ModelConfig cfg;

  ADAKV_ASSIGN_OR_RETURN(const ArchInfo* arch, find_architecture(f, root, source));
  cfg.architecture = arch->architecture;
  cfg.family = arch->family;

  if (f.set("quantization_config")) {
    return unimplemented(source + ": field 'quantization_config' is set: quantized checkpoints are not supported");
  }
  ADAKV_ASSIGN_OR_RETURN(const std::optional<std::string> act, f.opt_string("hidden_act"));
  if (act && *act != "silu") {
    return f.bad_value("hidden_act", "is '" + printable(*act) + "': not supported (only silu)");
  }
  ADAKV_ASSIGN_OR_RETURN(const bool mlp_bias, f.bool_or("mlp_bias", false));
  if (mlp_bias) return f.bad_value("mlp_bias", "is true: MLP biases are not supported");

  ADAKV_ASSIGN_OR_RETURN(cfg.vocab_size, f.req_int("vocab_size"));
  ADAKV_ASSIGN_OR_RETURN(cfg.hidden_size, f.req_int("hidden_size"));
  ADAKV_ASSIGN_OR_RETURN(cfg.intermediate_size, f.req_int("intermediate_size"));
  ADAKV_ASSIGN_OR_RETURN(cfg.num_layers, f.req_int("num_hidden_layers"));
  ADAKV_ASSIGN_OR_RETURN(cfg.num_heads, f.req_int("num_attention_heads"));
  ADAKV_ASSIGN_OR_RETURN(cfg.num_kv_heads, f.int_or("num_key_value_heads", cfg.num_heads));
  if (cfg.num_heads % cfg.num_kv_heads != 0) {
    return unimplemented(source + ": field 'num_attention_heads' (" + std::to_string(cfg.num_heads) +
                         ") is not divisible by 'num_key_value_heads' (" + std::to_string(cfg.num_kv_heads) + ")");
  }
  // head_dim: explicit value; null -> hidden/heads; absent -> the config class default, which is
  // 128 for Qwen3Config and hidden/heads for the others.
  if (f.set("head_dim")) {
    ADAKV_ASSIGN_OR_RETURN(cfg.head_dim, f.req_int("head_dim"));
  } else if (cfg.family == ModelFamily::kQwen3 && !f.present("head_dim")) {
    cfg.head_dim = 128;
  } else {
    if (cfg.hidden_size % cfg.num_heads != 0) {
      return unimplemented(source + ": field 'hidden_size' (" + std::to_string(cfg.hidden_size) +
                           ") is not divisible by 'num_attention_heads' (" + std::to_string(cfg.num_heads) +
                           ") and 'head_dim' is not given");
    }
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
  }
  if (cfg.head_dim % 2 != 0) return f.bad_value("head_dim", "must be even for RoPE");

  ADAKV_ASSIGN_OR_RETURN(const std::optional<double> eps, f.opt_double("rms_norm_eps"));
  cfg.rms_norm_eps = eps.value_or(1e-6);
  if (!(cfg.rms_norm_eps > 0)) return f.bad_value("rms_norm_eps", "must be positive");
  ADAKV_ASSIGN_OR_RETURN(cfg.max_position_embeddings,
                         f.int_or("max_position_embeddings", arch->default_max_positions));
  ADAKV_ASSIGN_OR_RETURN(cfg.tie_word_embeddings, f.bool_or("tie_word_embeddings", false));

  switch (cfg.family) {
    case ModelFamily::kQwen2:
      cfg.qkv_bias = true;
      cfg.o_bias = false;
      break;
    case ModelFamily::kLlama:
    case ModelFamily::kQwen3: {
      ADAKV_ASSIGN_OR_RETURN(const bool bias, f.bool_or("attention_bias", false));
      cfg.qkv_bias = bias;
      cfg.o_bias = bias;
      break;
    }
    case ModelFamily::kMistral: break;
  }
  cfg.qk_norm = cfg.family == ModelFamily::kQwen3;

  ADAKV_RETURN_IF_ERROR(parse_rope(f, root, source, &cfg));
  ADAKV_RETURN_IF_ERROR(parse_sliding_window(f, root, &cfg));
  ADAKV_RETURN_IF_ERROR(parse_dtype(f, &cfg));

  // Token ids. Absent keys take the config class defaults (Llama and Mistral: bos 1, eos 2;
  // Qwen: none); null means none.
  const bool llama_like = cfg.family == ModelFamily::kLlama || cfg.family == ModelFamily::kMistral;
  if (!f.present("bos_token_id")) {
    cfg.bos_token_id = llama_like ? 1 : -1;
  } else {
    ADAKV_ASSIGN_OR_RETURN(const std::optional<int32_t> bos, f.opt_token_id("bos_token_id"));
    cfg.bos_token_id = bos.value_or(-1);
  }
  cfg.eos_token_ids.clear();
  if (!f.present("eos_token_id")) {
    if (llama_like) cfg.eos_token_ids.push_back(2);
  } else {
    ADAKV_RETURN_IF_ERROR(f.append_token_ids("eos_token_id", &cfg.eos_token_ids));
  }
  return cfg;
}

Expected<ModelConfig> load_model_config(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const std::string config_path = (fs::path(model_dir) / "config.json").string();
  std::error_code ec;
  if (!fs::exists(config_path, ec)) return not_found(config_path + ": not found (every checkpoint needs config.json)");
  ADAKV_ASSIGN_OR_RETURN(const std::string text, read_text_file(config_path));
  ADAKV_ASSIGN_OR_RETURN(ModelConfig cfg, parse_model_config(text, config_path));

  // generation_config.json is optional; when present it adds end tokens (chat models list their
  // end-of-turn tokens there) and may set bos.
  const std::string gen_path = (fs::path(model_dir) / "generation_config.json").string();
  if (!fs::exists(gen_path, ec)) return cfg;
  ADAKV_ASSIGN_OR_RETURN(const std::string gen_text, read_text_file(gen_path));
  ADAKV_ASSIGN_OR_RETURN(const Json gen, parse_json_object(gen_text, gen_path));
  const Fields g(gen, gen_path);
  ADAKV_ASSIGN_OR_RETURN(const std::optional<int32_t> bos, g.opt_token_id("bos_token_id"));
  if (bos) cfg.bos_token_id = *bos;
  ADAKV_RETURN_IF_ERROR(g.append_token_ids("eos_token_id", &cfg.eos_token_ids));
  return cfg;
}

}  // namespace adakv
