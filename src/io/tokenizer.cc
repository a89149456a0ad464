// Tokenizer over a TokenizerSpec: added tokens are cut out of the raw text first (leftmost,
// longest), the rest goes through normalizer -> pre-tokenizer -> BPE, and the post-processor's
// ids go around the result; decode runs the decoder chain. Plus load() and StreamDecoder.
#include "io/tokenizer.h"

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>

#include "core/mapped_file.h"
#include "io/tokenizer_spec.h"
#include "io/unicode_text.h"

namespace adakv {
namespace {

// Byte trie over added-token contents: [node] -> sorted (byte, child) edges.
class TokenTrie {
 public:
  void add(std::string_view s, int32_t token_index) {
    if (s.empty()) return;
    first_[static_cast<unsigned char>(s[0])] = true;
    int32_t node = 0;
    for (unsigned char c : s) {
      auto& edges = nodes_[node].edges;
      auto it = std::lower_bound(edges.begin(), edges.end(), std::make_pair(c, int32_t{-1}));
      if (it != edges.end() && it->first == c) {
        node = it->second;
      } else {
        int32_t child = static_cast<int32_t>(nodes_.size());
        edges.insert(it, {c, child});
        nodes_.emplace_back();
        node = child;
      }
    }
    if (nodes_[node].token < 0) nodes_[node].token = token_index;  // the first of duplicates wins
    empty_ = false;
  }
  bool empty() const { return empty_; }
  bool may_start(unsigned char c) const { return first_[c]; }
  // Longest token starting at s[pos]: (token index, length), or (-1, 0).
  std::pair<int32_t, size_t> longest_at(std::string_view s, size_t pos) const {
    std::pair<int32_t, size_t> best{-1, 0};
    int32_t node = 0;
    for (size_t i = pos; i < s.size(); ++i) {
      const auto& edges = nodes_[node].edges;
      unsigned char c = static_cast<unsigned char>(s[i]);
      auto it = std::lower_bound(edges.begin(), edges.end(), std::make_pair(c, int32_t{-1}));
      if (it == edges.end() || it->first != c) break;
      node = it->second;
      if (nodes_[node].token >= 0) best = {nodes_[node].token, i + 1 - pos};
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> edges;
    int32_t token = -1;
  };
  std::vector<Node> nodes_{1};
  std::array<bool, 256> first_{};
  bool empty_ = true;
};

// Unicode \w as Rust's regex crate defines it (letters, marks, numbers, connector punctuation,
// joiners), which the added-token single_word rule of `tokenizers` tests.
bool is_word_char_at(std::string_view s, size_t pos) {
  static const auto word = tok::Regex::compile(R"(^[\w\p{M}\p{Pc}\x{200C}\x{200D}])");
  if (!word.has_value() || pos >= s.size()) return false;
  size_t end = pos;
  unicode::next_code_point(s, end);
  std::vector<std::pair<size_t, size_t>> m;
  (*word)->find_all(s.substr(pos, end - pos), m);
  return !m.empty();
}

size_t previous_char_start(std::string_view s, size_t end) {
  size_t p = end - 1;
  while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
  return p;
}

class HfTokenizer final : public Tokenizer {
 public:
  explicit HfTokenizer(tok::TokenizerSpec spec) : spec_(std::move(spec)) {
    special_.assign(spec_.id_to_token.size(), false);
    for (size_t i = 0; i < spec_.added_tokens.size(); ++i) {
      const tok::AddedToken& a = spec_.added_tokens[i];
      if (a.special) special_[a.id] = true;
      if (a.normalized) {
        std::string content = a.content;
        if (spec_.normalizer) spec_.normalizer->apply(content);
        normalized_trie_.add(content, static_cast<int32_t>(i));
        // `tokenizers` decodes such a token as its normalized form.
        spec_.id_to_token[a.id] = content;
      } else {
        raw_trie_.add(a.content, static_cast<int32_t>(i));
      }
    }
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::string repaired;
    if (!unicode::is_valid_utf8(text)) {
      repaired = unicode::to_valid_utf8(text);
      text = repaired;
    }
    std::vector<int32_t> ids;
    if (add_special) ids = spec_.prefix_ids;
    ids.reserve(ids.size() + text.size() / 3 + 4);
    for (const Match& m : find_matches(text, raw_trie_)) {
      if (m.token >= 0) {
        ids.push_back(spec_.added_tokens[m.token].id);
      } else {
        encode_segment(text.substr(m.start, m.end - m.start), m.start == 0, ids);
      }
    }
    if (add_special) ids.insert(ids.end(), spec_.suffix_ids.begin(), spec_.suffix_ids.end());
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= spec_.id_to_token.size() || !spec_.id_present[id]) continue;
      if (skip_special && special_[id]) continue;
      tokens.push_back(spec_.id_to_token[id]);
    }
    std::string out;
    if (spec_.decoder) {
      spec_.decoder->apply(tokens);
      for (const std::string& t : tokens) out += t;
    } else {
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i > 0) out += ' ';
        out += tokens[i];
      }
    }
    return out;
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(spec_.id_to_token.size()); }
  int32_t bos_id() const override { return spec_.bos_id; }
  std::vector<int32_t> eos_ids() const override { return spec_.eos_ids; }
  bool is_special(int32_t id) const override {
    return id >= 0 && static_cast<size_t>(id) < special_.size() && special_[id];
  }
  int32_t token_to_id(std::string_view token) const override {
    for (const tok::AddedToken& a : spec_.added_tokens) {
      if (a.content == token) return a.id;
    }
    return spec_.model->token_to_id(token);
  }

  void add_eos_ids(const std::vector<int32_t>& ids) {
    for (int32_t id : ids) {
      if (id >= 0 && id < vocab_size() && std::find(spec_.eos_ids.begin(), spec_.eos_ids.end(), id) == spec_.eos_ids.end()) {
        spec_.eos_ids.push_back(id);
      }
    }
  }

 private:
  struct Match {
    int32_t token;  // index into added_tokens, -1 for text
    size_t start, end;
  };

  // The text cut at added-token matches, with lstrip / rstrip / single_word as `tokenizers`
  // applies them; covers all of `s` (nothing for an empty `s`).
  std::vector<Match> find_matches(std::string_view s, const TokenTrie& trie) const {
    std::vector<Match> out;
    size_t start_offset = 0;
    if (!trie.empty()) {
      for (size_t pos = 0; pos < s.size();) {
        if (!trie.may_start(static_cast<unsigned char>(s[pos]))) {
          ++pos;
          continue;
        }
        auto [index, len] = trie.longest_at(s, pos);
        if (index < 0) {
          ++pos;
          continue;
        }
        size_t start = pos, stop = pos + len;
        pos = stop;
        const tok::AddedToken& a = spec_.added_tokens[index];
        if (a.single_word) {
          bool space_before = start == 0 || !is_word_char_at(s, previous_char_start(s, start));
          bool space_after = stop == s.size() || !is_word_char_at(s, stop);
          if (!space_before || !space_after) continue;
        }
        if (a.lstrip) {
          size_t new_start = start;
          while (new_start > 0) {
            size_t p = previous_char_start(s, new_start), q = p;
            if (!unicode::is_whitespace(unicode::next_code_point(s, q))) break;
            new_start = p;
          }
          start = std::max(new_start, start_offset);
        }
        if (a.rstrip) {
          while (stop < s.size()) {
            size_t q = stop;
            if (!unicode::is_whitespace(unicode::next_code_point(s, q))) break;
            stop = q;
          }
          pos = stop;
        }
        if (start_offset < start) out.push_back({-1, start_offset, start});
        out.push_back({index, start, stop});
        start_offset = stop;
      }
    }
    if (start_offset < s.size()) out.push_back({-1, start_offset, s.size()});
    return out;
  }

  void encode_segment(std::string_view segment, bool at_start, std::vector<int32_t>& ids) const {
    std::string text(segment);
    if (spec_.normalizer) spec_.normalizer->apply(text);
    if (normalized_trie_.empty()) {
      encode_normalized(std::move(text), at_start, ids);
      return;
    }
    for (const Match& m : find_matches(text, normalized_trie_)) {
      if (m.token >= 0) {
        ids.push_back(spec_.added_tokens[m.token].id);
      } else {
        encode_normalized(text.substr(m.start, m.end - m.start), at_start && m.start == 0, ids);
      }
    }
  }

  void encode_normalized(std::string text, bool at_start, std::vector<int32_t>& ids) const {
    if (text.empty()) return;
    std::vector<tok::Piece> pieces;
    pieces.push_back({std::move(text), at_start});
    if (spec_.pre_tokenizer) spec_.pre_tokenizer->apply(pieces);
    for (const tok::Piece& p : pieces) spec_.model->encode_word(p.text, ids);
  }

  tok::TokenizerSpec spec_;
  std::vector<bool> special_;  // [id]
  TokenTrie raw_trie_, normalized_trie_;
};

// eos_token_id of generation_config.json (else config.json): an id or a list of ids.
Expected<std::vector<int32_t>> model_eos_ids(const std::string& dir) {
  for (const char* name : {"generation_config.json", "config.json"}) {
    std::string path = dir + "/" + name;
    auto text = read_text_file(path);
    if (!text.has_value()) continue;
    auto j = nlohmann::json::parse(*text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return data_loss(path + ": not a valid JSON object");
    auto it = j.find("eos_token_id");
    if (it == j.end() || it->is_null()) continue;
    std::vector<int32_t> ids;
    auto add = [&](const nlohmann::json& v) {
      if (v.is_number_integer()) ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    };
    if (it->is_array()) {
      for (const auto& v : *it) add(v);
    } else {
      add(*it);
    }
    return ids;
  }
  return std::vector<int32_t>{};
}

}  // namespace

Expected<std::shared_ptr<Tokenizer>> Tokenizer::from_json(const std::string& tokenizer_json,
                                                          const std::string& tokenizer_config_json,
                                                          const std::string& source,
                                                          const std::string& model_config_json) {
  ADAKV_ASSIGN_OR_RETURN(tok::TokenizerSpec spec, tok::parse_tokenizer_spec(tokenizer_json, tokenizer_config_json,
                                                                           model_config_json, source));
  return std::shared_ptr<Tokenizer>(std::make_shared<HfTokenizer>(std::move(spec)));
}

Expected<std::shared_ptr<Tokenizer>> Tokenizer::load(const std::string& model_dir) {
  std::string path = model_dir + "/tokenizer.json";
  auto text = read_text_file(path);
  if (!text.has_value()) return not_found(text.status().message());  // names the file
  std::string config_path = model_dir + "/tokenizer_config.json";
  auto config = read_text_file(config_path);
  std::string config_text = config.has_value() ? *config : std::string();
  if (config.has_value() && config_text.empty()) return data_loss(config_path + ": empty file");
  // config.json is optional here (its model_type only matters for a few tokenizer classes).
  auto model_config = read_text_file(model_dir + "/config.json");
  std::string model_config_text = model_config.has_value() ? *model_config : std::string();
  ADAKV_ASSIGN_OR_RETURN(tok::TokenizerSpec spec, tok::parse_tokenizer_spec(*text, config_text, model_config_text, path));
  auto tokenizer = std::make_shared<HfTokenizer>(std::move(spec));
  ADAKV_ASSIGN_OR_RETURN(std::vector<int32_t> eos, model_eos_ids(model_dir));
  tokenizer->add_eos_ids(eos);
  return std::shared_ptr<Tokenizer>(std::move(tokenizer));
}

StreamDecoder::StreamDecoder(std::shared_ptr<const Tokenizer> tokenizer, bool skip_special)
    : tokenizer_(std::move(tokenizer)), skip_special_(skip_special) {}

// Decodes a window of ids twice, without and with the newest ones, and emits the difference
// once it is complete text: decoders that treat the first token specially (Strip, Metaspace)
// see the same first token in both, and bytes of a character split over tokens (byte fallback,
// byte-level) show up as a trailing U+FFFD until the character is complete.
std::string StreamDecoder::push(int32_t id) {
  ids_.push_back(id);
  return flush(false);
}

std::string StreamDecoder::finish() { return flush(true); }

std::string StreamDecoder::flush(bool final) {
  std::vector<int32_t> window(ids_.begin() + prefix_offset_, ids_.end());
  std::vector<int32_t> prefix(ids_.begin() + prefix_offset_, ids_.begin() + read_offset_);
  std::string prefix_text = tokenizer_->decode(prefix, skip_special_);
  std::string new_text = tokenizer_->decode(window, skip_special_);
  // Normally the old text is a prefix of the new; if a decoder rewrote it, emit from where the
  // two agree (what was already emitted cannot be taken back).
  size_t common = 0;
  while (common < prefix_text.size() && common < new_text.size() && prefix_text[common] == new_text[common]) ++common;
  while (common > 0 && common < new_text.size() && (static_cast<unsigned char>(new_text[common]) & 0xC0) == 0x80) --common;
  if (new_text.size() <= common) return std::string();
  if (!final && new_text.ends_with("\xEF\xBF\xBD")) return std::string();
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return new_text.substr(common);
}

}  // namespace adakv
