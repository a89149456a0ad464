// tokenizer.json (+ tokenizer_config.json) -> TokenizerSpec.
#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/printable.h"
#include "io/tokenizer_spec.h"

namespace adakv::tok {
namespace {

using json = nlohmann::json;

// Thrown inside this file only and turned into a Status by parse_tokenizer_spec.
struct SpecError {
  Status status;
};
[[noreturn]] void malformed(const std::string& m) { throw SpecError{data_loss(m)}; }
[[noreturn]] void unsupported(const std::string& m) { throw SpecError{unimplemented(m)}; }

// Qwen2Tokenizer's split pattern (transformers 5 rebuilds Qwen2/Qwen3 tokenizers with it).
constexpr const char* kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kMetaspaceChar = "\xE2\x96\x81";  // ▁
// Ids beyond this many times the number of tokens (plus slack) are refused: id_to_token is dense.
constexpr size_t kMaxIdSlack = 1024;
// Sequence stages nest; real files use one level.
constexpr int kMaxNesting = 16;

bool opt_bool(const json& o, const char* key, bool fallback) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) malformed(std::string("'") + key + "' is not a boolean");
  return it->get<bool>();
}

std::string opt_string(const json& o, const char* key, const std::string& fallback) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return fallback;
  if (!it->is_string()) malformed(std::string("'") + key + "' is not a string");
  return it->get<std::string>();
}

const json& require(const json& o, const char* key, const std::string& where) {
  auto it = o.find(key);
  if (it == o.end()) malformed(where + " has no '" + key + "'");
  return *it;
}

std::string type_of(const json& o, const std::string& where) {
  if (!o.is_object()) malformed(where + " is not an object");
  auto it = o.find("type");
  if (it == o.end() || !it->is_string()) malformed(where + " has no 'type'");
  return it->get<std::string>();
}

const json& require_array(const json& o, const char* key, const std::string& where) {
  const json& a = require(o, key, where);
  if (!a.is_array()) malformed(where + " '" + key + "' is not a list");
  return a;
}

Pattern compile_regex(const std::string& source) {
  auto re = Regex::compile(source);
  if (!re.has_value()) malformed(re.status().message());
  return Pattern{"", std::move(re).value()};
}

Pattern parse_pattern(const json& p, const std::string& where) {
  if (p.is_object() && p.contains("String") && p["String"].is_string()) return Pattern{p["String"].get<std::string>(), nullptr};
  if (p.is_object() && p.contains("Regex") && p["Regex"].is_string()) return compile_regex(p["Regex"].get<std::string>());
  malformed(where + " pattern is neither {\"String\": ...} nor {\"Regex\": ...}");
}

PrependScheme parse_prepend_scheme(const json& o, const std::string& where) {
  if (o.contains("prepend_scheme") && !o["prepend_scheme"].is_null()) {
    std::string s = opt_string(o, "prepend_scheme", "always");
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    malformed(where + " prepend_scheme '" + s + "' is unknown");
  }
  // Files older than prepend_scheme have add_prefix_space.
  return opt_bool(o, "add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

Normalizer parse_normalizer(const json& o, int depth = 0) {
  if (depth > kMaxNesting) malformed("normalizer nested too deeply");
  std::string type = type_of(o, "normalizer");
  Normalizer n;
  if (type == "Sequence") {
    n.kind = Normalizer::Kind::kSequence;
    for (const json& c : require_array(o, "normalizers", "normalizer Sequence")) n.children.push_back(parse_normalizer(c, depth + 1));
  } else if (type == "Prepend") {
    n.kind = Normalizer::Kind::kPrepend;
    n.text = opt_string(o, "prepend", "");
  } else if (type == "Replace") {
    n.kind = Normalizer::Kind::kReplace;
    n.pattern = parse_pattern(require(o, "pattern", "normalizer Replace"), "normalizer Replace");
    n.text = opt_string(o, "content", "");
  } else if (type == "NFC") {
    n.kind = Normalizer::Kind::kNfc;
  } else if (type == "NFD") {
    n.kind = Normalizer::Kind::kNfd;
  } else if (type == "Lowercase") {
    n.kind = Normalizer::Kind::kLowercase;
  } else if (type == "Strip") {
    n.kind = Normalizer::Kind::kStrip;
    n.strip_left = opt_bool(o, "strip_left", true);
    n.strip_right = opt_bool(o, "strip_right", true);
  } else {
    unsupported("normalizer type '" + type + "' is not supported");
  }
  return n;
}

PreTokenizer parse_pre_tokenizer(const json& o, int depth = 0) {
  if (depth > kMaxNesting) malformed("pre_tokenizer nested too deeply");
  std::string type = type_of(o, "pre_tokenizer");
  PreTokenizer p;
  if (type == "Sequence") {
    p.kind = PreTokenizer::Kind::kSequence;
    for (const json& c : require_array(o, "pretokenizers", "pre_tokenizer Sequence")) {
      p.children.push_back(parse_pre_tokenizer(c, depth + 1));
    }
  } else if (type == "Split") {
    p.kind = PreTokenizer::Kind::kSplit;
    p.pattern = parse_pattern(require(o, "pattern", "pre_tokenizer Split"), "pre_tokenizer Split");
    std::string b = opt_string(o, "behavior", "Isolated");
    if (b == "Removed") p.behavior = SplitBehavior::kRemoved;
    else if (b == "Isolated") p.behavior = SplitBehavior::kIsolated;
    else if (b == "MergedWithPrevious") p.behavior = SplitBehavior::kMergedWithPrevious;
    else if (b == "MergedWithNext") p.behavior = SplitBehavior::kMergedWithNext;
    else if (b == "Contiguous") p.behavior = SplitBehavior::kContiguous;
    else malformed("pre_tokenizer Split behavior '" + b + "' is unknown");
    p.invert = opt_bool(o, "invert", false);
  } else if (type == "ByteLevel") {
    p.kind = PreTokenizer::Kind::kByteLevel;
    p.add_prefix_space = opt_bool(o, "add_prefix_space", true);
    p.use_regex = opt_bool(o, "use_regex", true);
    if (p.use_regex) p.pattern = compile_regex(kGpt2Pattern);
  } else if (type == "Metaspace") {
    p.kind = PreTokenizer::Kind::kMetaspace;
    p.replacement = opt_string(o, "replacement", kMetaspaceChar);
    if (p.replacement.empty()) malformed("pre_tokenizer Metaspace has an empty replacement");
    p.prepend_scheme = parse_prepend_scheme(o, "pre_tokenizer Metaspace");
    p.split = opt_bool(o, "split", true);
  } else {
    unsupported("pre_tokenizer type '" + type + "' is not supported");
  }
  return p;
}

Decoder parse_decoder(const json& o, int depth = 0) {
  if (depth > kMaxNesting) malformed("decoder nested too deeply");
  std::string type = type_of(o, "decoder");
  Decoder d;
  if (type == "Sequence") {
    d.kind = Decoder::Kind::kSequence;
    for (const json& c : require_array(o, "decoders", "decoder Sequence")) d.children.push_back(parse_decoder(c, depth + 1));
  } else if (type == "ByteLevel") {
    d.kind = Decoder::Kind::kByteLevel;
  } else if (type == "Replace") {
    d.kind = Decoder::Kind::kReplace;
    d.pattern = parse_pattern(require(o, "pattern", "decoder Replace"), "decoder Replace");
    d.text = opt_string(o, "content", "");
  } else if (type == "ByteFallback") {
    d.kind = Decoder::Kind::kByteFallback;
  } else if (type == "Fuse") {
    d.kind = Decoder::Kind::kFuse;
  } else if (type == "Strip") {
    d.kind = Decoder::Kind::kStrip;
    d.text = opt_string(o, "content", " ");
    auto count = [&](const char* key) {
      auto it = o.find(key);
      if (it == o.end() || it->is_null()) return 0;
      if (!it->is_number_unsigned()) malformed(std::string("decoder Strip '") + key + "' is not a count");
      return static_cast<int>(std::min<uint64_t>(it->get<uint64_t>(), 1 << 20));
    };
    d.strip_start = count("start");
    d.strip_stop = count("stop");
  } else if (type == "Metaspace") {
    d.kind = Decoder::Kind::kMetaspace;
    d.text = opt_string(o, "replacement", kMetaspaceChar);
    d.prepend_scheme = parse_prepend_scheme(o, "decoder Metaspace");
  } else {
    unsupported("decoder type '" + type + "' is not supported");
  }
  return d;
}

// Looks a token up among the added tokens, then the vocabulary; -1 when absent.
int32_t find_token(const TokenizerSpec& spec, const std::string& token) {
  for (const AddedToken& a : spec.added_tokens) {
    if (a.content == token) return a.id;
  }
  return spec.model ? spec.model->token_to_id(token) : -1;
}

// Flattens a post-processor into the ids around a single sequence.
void parse_post_processor(const json& o, TokenizerSpec& spec, int depth = 0) {
  if (depth > kMaxNesting) malformed("post_processor nested too deeply");
  std::string type = type_of(o, "post_processor");
  if (type == "Sequence") {
    for (const json& c : require_array(o, "processors", "post_processor Sequence")) parse_post_processor(c, spec, depth + 1);
  } else if (type == "ByteLevel") {
    // Only trims offsets; ids unchanged.
  } else if (type == "TemplateProcessing") {
    const json& tokens = require(o, "special_tokens", "post_processor TemplateProcessing");
    auto ids_of = [&](const std::string& name) {
      std::vector<int32_t> ids;
      auto it = tokens.find(name);
      if (it == tokens.end() || !it->is_object() || !it->contains("ids") || !(*it)["ids"].is_array()) {
        malformed("post_processor TemplateProcessing uses '" + name + "' which is not in special_tokens");
      }
      for (const json& id : (*it)["ids"]) {
        if (!id.is_number_unsigned()) malformed("post_processor TemplateProcessing '" + name + "' has a bad id");
        ids.push_back(static_cast<int32_t>(std::min<uint64_t>(id.get<uint64_t>(), INT32_MAX)));
      }
      return ids;
    };
    std::vector<int32_t> prefix, suffix;
    bool seen_sequence = false;
    auto add_piece = [&](const std::string& name) {
      std::vector<int32_t> ids = ids_of(name);
      auto& dst = seen_sequence ? suffix : prefix;
      dst.insert(dst.end(), ids.begin(), ids.end());
    };
    const json& single = require(o, "single", "post_processor TemplateProcessing");
    if (single.is_array()) {
      for (const json& piece : single) {
        if (piece.is_object() && piece.contains("Sequence")) {
          seen_sequence = true;
        } else if (piece.is_object() && piece.contains("SpecialToken") && piece["SpecialToken"].is_object()) {
          add_piece(opt_string(piece["SpecialToken"], "id", ""));
        } else {
          malformed("post_processor TemplateProcessing has a bad template piece");
        }
      }
    } else if (single.is_string()) {
      // "<s>:0 $A:0" form.
      std::string s = single.get<std::string>();
      for (size_t i = 0; i < s.size();) {
        size_t j = s.find(' ', i);
        if (j == std::string::npos) j = s.size();
        std::string piece = s.substr(i, j - i);
        i = j + 1;
        if (piece.empty()) continue;
        if (piece[0] == '$') {
          seen_sequence = true;
          continue;
        }
        size_t colon = piece.rfind(':');
        add_piece(colon == std::string::npos ? piece : piece.substr(0, colon));
      }
    } else {
      malformed("post_processor TemplateProcessing 'single' is neither a list nor a string");
    }
    // A later processor wraps the output of an earlier one.
    spec.prefix_ids.insert(spec.prefix_ids.begin(), prefix.begin(), prefix.end());
    spec.suffix_ids.insert(spec.suffix_ids.end(), suffix.begin(), suffix.end());
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto id_of = [&](const char* key) {
      const json& pair = require(o, key, "post_processor " + type);
      if (!pair.is_array() || pair.size() != 2 || !pair[1].is_number_unsigned()) {
        malformed("post_processor " + type + " '" + key + "' is not [token, id]");
      }
      return static_cast<int32_t>(std::min<uint64_t>(pair[1].get<uint64_t>(), INT32_MAX));
    };
    spec.prefix_ids.insert(spec.prefix_ids.begin(), id_of("cls"));
    spec.suffix_ids.push_back(id_of("sep"));
  } else {
    unsupported("post_processor type '" + type + "' is not supported");
  }
}

struct ModelJson {
  Vocab vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  BpeOptions options;
};

ModelJson parse_model(const json& m) {
  if (!m.is_object()) malformed("'model' is not an object");
  std::string type = m.contains("type") ? opt_string(m, "type", "") : (m.contains("merges") ? "BPE" : "");
  if (type != "BPE") unsupported("model type '" + type + "' is not supported (only BPE)");
  ModelJson out;
  const json& vocab = require(m, "vocab", "model");
  if (!vocab.is_object()) malformed("model 'vocab' is not an object");
  out.vocab.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_unsigned() || it.value().get<uint64_t>() > INT32_MAX) {
      malformed("model vocab id of '" + it.key() + "' is not a valid id");
    }
    out.vocab[it.key()] = static_cast<int32_t>(it.value().get<uint64_t>());
  }
  auto merges = m.find("merges");
  if (merges != m.end() && !merges->is_null()) {
    if (!merges->is_array()) malformed("model 'merges' is not a list");
    out.merges.reserve(merges->size());
    for (const json& merge : *merges) {
      if (merge.is_string()) {
        const std::string& s = merge.get_ref<const std::string&>();
        size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
          malformed("model merge '" + s + "' is not two tokens separated by one space");
        }
        out.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
        out.merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
      } else {
        malformed("model merge is neither \"a b\" nor [\"a\", \"b\"]");
      }
    }
  }
  auto dropout = m.find("dropout");
  if (dropout != m.end() && !dropout->is_null() && (!dropout->is_number() || dropout->get<double>() > 0)) {
    unsupported("BPE dropout is not supported");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (!opt_string(m, key, "").empty()) unsupported(std::string("BPE ") + key + " is not supported");
  }
  out.options.unk_token = opt_string(m, "unk_token", "");
  out.options.fuse_unk = opt_bool(m, "fuse_unk", false);
  out.options.byte_fallback = opt_bool(m, "byte_fallback", false);
  out.options.ignore_merges = opt_bool(m, "ignore_merges", false);
  return out;
}

std::vector<AddedToken> parse_added_tokens(const json& root) {
  std::vector<AddedToken> out;
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return out;
  if (!it->is_array()) malformed("'added_tokens' is not a list");
  for (const json& t : *it) {
    if (!t.is_object()) malformed("an added token is not an object");
    AddedToken a;
    const json& id = require(t, "id", "added token");
    if (!id.is_number_unsigned() || id.get<uint64_t>() > INT32_MAX) malformed("an added token has a bad id");
    a.id = static_cast<int32_t>(id.get<uint64_t>());
    a.content = opt_string(t, "content", "");
    if (a.content.empty()) malformed("added token " + std::to_string(a.id) + " has no content");
    a.special = opt_bool(t, "special", false);
    a.lstrip = opt_bool(t, "lstrip", false);
    a.rstrip = opt_bool(t, "rstrip", false);
    a.single_word = opt_bool(t, "single_word", false);
    a.normalized = opt_bool(t, "normalized", !a.special);
    out.push_back(std::move(a));
  }
  return out;
}

// The special tokens a transformers 5 tokenizer class defaults to when the config has no key.
std::string class_default_token(const std::string& cls, const std::string& key) {
  if (cls == "LlamaTokenizer") {
    if (key == "bos_token") return "<s>";
    if (key == "eos_token") return "</s>";
    if (key == "unk_token") return "<unk>";
  } else if (cls == "Qwen2Tokenizer") {
    if (key == "eos_token" || key == "unk_token" || key == "pad_token") return "<|endoftext|>";
  } else if (cls == "GPT2Tokenizer") {
    if (key == "bos_token" || key == "eos_token" || key == "unk_token") return "<|endoftext|>";
  }
  return "";
}

// A special token of tokenizer_config.json: "text", {"content": "text", ...} or null; absent:
// the default of the tokenizer class.
std::string config_token(const json& config, const std::string& cls, const char* key) {
  auto it = config.find(key);
  if (it == config.end()) return class_default_token(cls, key);
  if (it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) return opt_string(*it, "content", "");
  malformed(std::string("tokenizer_config.json '") + key + "' is neither a string nor an object");
}

std::string without_fast(std::string cls) {
  if (cls.size() > 4 && cls.ends_with("Fast")) cls.resize(cls.size() - 4);
  return cls;
}

// The tokenizer class transformers 5's AutoTokenizer picks (models/auto/tokenization_auto.py),
// for the model types this engine runs: the class named by tokenizer_config.json (or
// config.json), except where the model type registers another one.
std::string resolve_tokenizer_class(const json& config, const json& model_config, const std::string& tokenizer_json) {
  std::string hub = opt_string(config, "tokenizer_class", "");
  if (hub.empty()) hub = opt_string(model_config, "tokenizer_class", "");
  hub = without_fast(hub);
  std::string model_type = opt_string(model_config, "model_type", "");
  // TOKENIZER_MAPPING_NAMES of transformers 5 for these model types ("" = none registered).
  std::string registered;
  if (model_type == "mistral" || model_type == "mixtral") registered = "TokenizersBackend";
  else if (model_type == "qwen2" || model_type == "qwen2_moe" || model_type == "qwen3" || model_type == "qwen3_moe") registered = "Qwen2Tokenizer";
  else if (model_type == "gpt2") registered = "GPT2Tokenizer";
  // MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS (of these model types).
  bool hub_class_distrusted = model_type == "qwen2";
  // LlamaTokenizer would force Metaspace on a byte-level file.
  if (hub == "LlamaTokenizer" && !hub_class_distrusted && tokenizer_json.find("\"ByteLevel\"") != std::string::npos) {
    return "TokenizersBackend";
  }
  if (!hub.empty() && !registered.empty() && registered != hub) {
    if (registered != "TokenizersBackend") return hub_class_distrusted ? registered : hub;
    return "TokenizersBackend";
  }
  if (!hub.empty()) return hub;
  return registered.empty() ? "TokenizersBackend" : registered;
}

Decoder decoder_of(Decoder::Kind kind) {
  Decoder d;
  d.kind = kind;
  return d;
}

// What the __init__ of transformers 5's LlamaTokenizer / Qwen2Tokenizer / GPT2Tokenizer builds
// instead of the file's normalizer, pre-tokenizer and decoder (the model keeps only vocab and
// merges; the post-processor is the file's). Other classes run tokenizer.json as it is.
void apply_tokenizer_class(const std::string& cls, const json& config, TokenizerSpec& spec, ModelJson& model) {
  if (cls == "LlamaTokenizer") {
    bool add_prefix_space = opt_bool(config, "add_prefix_space", true);
    bool legacy = opt_bool(config, "legacy", false);
    spec.normalizer.reset();
    PreTokenizer meta;
    meta.kind = PreTokenizer::Kind::kMetaspace;
    meta.replacement = kMetaspaceChar;
    meta.prepend_scheme = !add_prefix_space ? PrependScheme::kNever : legacy ? PrependScheme::kAlways : PrependScheme::kFirst;
    meta.split = false;
    spec.pre_tokenizer = std::move(meta);
    Decoder seq;
    seq.kind = Decoder::Kind::kSequence;
    Decoder replace;
    replace.kind = Decoder::Kind::kReplace;
    replace.pattern = Pattern{kMetaspaceChar, nullptr};
    replace.text = " ";
    seq.children.push_back(std::move(replace));
    seq.children.push_back(decoder_of(Decoder::Kind::kByteFallback));
    seq.children.push_back(decoder_of(Decoder::Kind::kFuse));
    if (add_prefix_space) {
      Decoder strip;
      strip.kind = Decoder::Kind::kStrip;
      strip.text = " ";
      strip.strip_start = 1;
      seq.children.push_back(std::move(strip));
    }
    spec.decoder = std::move(seq);
    model.options = BpeOptions{.byte_fallback = true, .fuse_unk = true, .ignore_merges = false, .unk_token = ""};
  } else if (cls == "Qwen2Tokenizer") {
    spec.normalizer.emplace();
    spec.normalizer->kind = Normalizer::Kind::kNfc;
    PreTokenizer split;
    split.kind = PreTokenizer::Kind::kSplit;
    split.pattern = compile_regex(kQwen2Pattern);
    split.behavior = SplitBehavior::kIsolated;
    PreTokenizer bytes;
    bytes.kind = PreTokenizer::Kind::kByteLevel;
    bytes.add_prefix_space = opt_bool(config, "add_prefix_space", false);
    bytes.use_regex = false;
    PreTokenizer seq;
    seq.kind = PreTokenizer::Kind::kSequence;
    seq.children.push_back(std::move(split));
    seq.children.push_back(std::move(bytes));
    spec.pre_tokenizer = std::move(seq);
    spec.decoder = decoder_of(Decoder::Kind::kByteLevel);
    model.options = BpeOptions{};
  } else if (cls == "GPT2Tokenizer") {
    spec.normalizer.reset();
    PreTokenizer bytes;
    bytes.kind = PreTokenizer::Kind::kByteLevel;
    bytes.add_prefix_space = opt_bool(config, "add_prefix_space", false);
    bytes.use_regex = true;
    bytes.pattern = compile_regex(kGpt2Pattern);
    spec.pre_tokenizer = std::move(bytes);
    spec.decoder = decoder_of(Decoder::Kind::kByteLevel);
    model.options = BpeOptions{};
  }
}

TokenizerSpec parse(const std::string& tokenizer_json, const std::string& config_json,
                    const std::string& model_config_json) {
  json root = json::parse(tokenizer_json, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) malformed("not valid JSON");
  if (!root.is_object()) malformed("not a JSON object");
  json config = json::object();
  json model_config = json::object();
  // Without either config file the tokenizer runs as the `tokenizers` library runs the file.
  bool have_config = !config_json.empty() || !model_config_json.empty();
  if (!config_json.empty()) {
    config = json::parse(config_json, nullptr, false);
    if (config.is_discarded() || !config.is_object()) malformed("tokenizer_config.json is not a valid JSON object");
  }
  if (!model_config_json.empty()) {
    model_config = json::parse(model_config_json, nullptr, false);
    if (model_config.is_discarded() || !model_config.is_object()) malformed("config.json is not a valid JSON object");
  }

  TokenizerSpec spec;
  ModelJson model = parse_model(require(root, "model", "tokenizer.json"));
  if (auto it = root.find("normalizer"); it != root.end() && !it->is_null()) spec.normalizer = parse_normalizer(*it);
  if (auto it = root.find("pre_tokenizer"); it != root.end() && !it->is_null()) {
    spec.pre_tokenizer = parse_pre_tokenizer(*it);
  }
  if (auto it = root.find("decoder"); it != root.end() && !it->is_null()) spec.decoder = parse_decoder(*it);
  spec.added_tokens = parse_added_tokens(root);

  std::string cls = have_config ? resolve_tokenizer_class(config, model_config, tokenizer_json) : "";
  apply_tokenizer_class(cls, config, spec, model);

  auto bpe = BpeModel::create(std::move(model.vocab), model.merges, model.options);
  if (!bpe.has_value()) malformed(bpe.status().message());
  spec.model = std::move(bpe).value();

  if (auto it = root.find("post_processor"); it != root.end() && !it->is_null()) parse_post_processor(*it, spec);

  if (have_config) {
    // transformers adds the special tokens of the config that are not added tokens yet.
    std::vector<std::string> specials;
    for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"}) specials.push_back(config_token(config, cls, key));
    // transformers 5 reads extra_special_tokens (a list, or a map name -> token) and, when that
    // is missing or empty, transformers 4's additional_special_tokens.
    auto extra = config.find("extra_special_tokens");
    bool has_extra = extra != config.end() && (extra->is_array() || extra->is_object()) && !extra->empty();
    if (!has_extra) extra = config.find("additional_special_tokens");
    if (extra != config.end() && (extra->is_array() || extra->is_object())) {
      for (const json& t : *extra) {
        if (t.is_string()) specials.push_back(t.get<std::string>());
        else if (t.is_object()) specials.push_back(opt_string(t, "content", ""));
      }
    }
    for (const std::string& s : specials) {
      if (s.empty()) continue;
      bool present = std::any_of(spec.added_tokens.begin(), spec.added_tokens.end(),
                                 [&](const AddedToken& a) { return a.content == s; });
      if (present) continue;
      int32_t id = spec.model->token_to_id(s);
      if (id < 0) {
        id = 0;
        for (const auto& [tok, i] : spec.model->vocab()) id = std::max(id, i + 1);
        for (const AddedToken& a : spec.added_tokens) id = std::max(id, a.id + 1);
      }
      spec.added_tokens.push_back(AddedToken{.id = id, .content = s, .special = true});
    }

    std::string bos = config_token(config, cls, "bos_token");
    std::string eos = config_token(config, cls, "eos_token");
    spec.bos_id = bos.empty() ? -1 : find_token(spec, bos);
    int32_t eos_id = eos.empty() ? -1 : find_token(spec, eos);
    if (eos_id >= 0) spec.eos_ids.push_back(eos_id);
    // transformers 5 drops add_bos_token / add_eos_token from the config when tokenizer.json
    // exists: only the file's post-processor adds special tokens (none without one).
  }

  // Dense id -> token table.
  size_t count = spec.model->vocab().size() + spec.added_tokens.size();
  size_t max_id = 0;
  for (const auto& [tok, id] : spec.model->vocab()) max_id = std::max<size_t>(max_id, id);
  for (const AddedToken& a : spec.added_tokens) max_id = std::max<size_t>(max_id, a.id);
  if (max_id >= 2 * count + kMaxIdSlack) malformed("token id " + std::to_string(max_id) + " is far beyond the vocabulary size");
  size_t n = count == 0 ? 0 : max_id + 1;
  spec.id_to_token.assign(n, "");
  spec.id_present.assign(n, false);
  for (const auto& [tok, id] : spec.model->vocab()) {
    spec.id_to_token[id] = tok;
    spec.id_present[id] = true;
  }
  for (const AddedToken& a : spec.added_tokens) {
    spec.id_to_token[a.id] = a.content;
    spec.id_present[a.id] = true;
  }
  for (int32_t id : spec.prefix_ids) {
    if (id < 0 || static_cast<size_t>(id) >= n) malformed("post_processor id " + std::to_string(id) + " is out of range");
  }
  for (int32_t id : spec.suffix_ids) {
    if (id < 0 || static_cast<size_t>(id) >= n) malformed("post_processor id " + std::to_string(id) + " is out of range");
  }
  return spec;
}

}  // namespace

Expected<TokenizerSpec> parse_tokenizer_spec(const std::string& tokenizer_json, const std::string& config_json,
                                             const std::string& model_config_json, const std::string& source) {
  // Messages quote names, types and tokens from the files: one line whatever they hold.
  constexpr size_t kMaxMessage = 2000;
  try {
    return parse(tokenizer_json, config_json, model_config_json);
  } catch (const SpecError& e) {
    return Status(e.status.code(), source + ": " + printable(e.status.message(), kMaxMessage));
  } catch (const nlohmann::json::exception& e) {
    return data_loss(source + ": " + printable(e.what(), kMaxMessage));
  }
}

}  // namespace adakv::tok
