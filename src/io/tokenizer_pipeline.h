// The stages of a Hugging Face tokenizer between added-token matching and the BPE model
// (normalizers, pre-tokenizers) and after it (decoders), with the semantics of the `tokenizers`
// library (Rust) that transformers runs. Built from tokenizer.json by tokenizer_json.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "io/tokenizer_regex.h"

namespace adakv::tok {

// A literal string or a regex, as the {"String": ...} / {"Regex": ...} objects of tokenizer.json.
struct Pattern {
  std::string literal;
  std::shared_ptr<const Regex> regex;  // set for a regex pattern
  // Non-overlapping matches in `s` as [start, end) byte ranges (an empty literal matches nothing).
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;
};

struct Normalizer {
  enum class Kind { kSequence, kPrepend, kReplace, kNfc, kNfd, kLowercase, kStrip };
  Kind kind = Kind::kSequence;
  std::string text;  // kPrepend: prefix; kReplace: replacement
  Pattern pattern;   // kReplace
  bool strip_left = false, strip_right = false;  // kStrip
  std::vector<Normalizer> children;              // kSequence
  void apply(std::string& s) const;
};

// A pre-tokenized piece; `at_start` when it begins at offset 0 of the original input (what
// Metaspace's prepend_scheme "first" tests).
struct Piece {
  std::string text;
  bool at_start = false;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
enum class PrependScheme { kAlways, kFirst, kNever };

struct PreTokenizer {
  enum class Kind { kSequence, kSplit, kByteLevel, kMetaspace };
  Kind kind = Kind::kSequence;
  Pattern pattern;  // kSplit; kByteLevel with use_regex (the GPT-2 pattern)
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // kByteLevel
  bool use_regex = true;          // kByteLevel
  std::string replacement;        // kMetaspace ("▁")
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;                  // kMetaspace
  std::vector<PreTokenizer> children;  // kSequence
  void apply(std::vector<Piece>& pieces) const;
};

struct Decoder {
  enum class Kind { kSequence, kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace };
  Kind kind = Kind::kSequence;
  Pattern pattern;   // kReplace
  std::string text;  // kReplace: replacement; kStrip: the character; kMetaspace: replacement
  int strip_start = 0, strip_stop = 0;  // kStrip
  PrependScheme prepend_scheme = PrependScheme::kAlways;  // kMetaspace
  std::vector<Decoder> children;        // kSequence
  // The "decode_chain" step: tokens in, tokens out (joined by the caller).
  void apply(std::vector<std::string>& tokens) const;
};

// GPT-2's byte <-> printable code point table (bytes_to_unicode).
const std::vector<std::string>& byte_to_unicode();   // [256] -> UTF-8 of the mapped char
int unicode_to_byte(char32_t cp);                    // -1 when cp is not a mapped char
// The GPT-2 split pattern ByteLevel uses when use_regex is true.
extern const char* const kGpt2Pattern;

}  // namespace adakv::tok
