// Tokenizer for chat templates, mirroring jinja2's lexer under the settings transformers uses
// (trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False): newlines normalised to
// "\n", one trailing newline dropped, `{%-`/`-%}` stripping, `{%+`/`+%}` opting out, and the
// whitespace that trim_blocks/lstrip_blocks remove around block and comment tags.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace adakv::jinja {

enum class TokenKind : uint8_t {
  kData,           // literal template text (already whitespace-controlled)
  kVariableBegin,  // {{
  kVariableEnd,    // }}
  kBlockBegin,     // {%
  kBlockEnd,       // %}
  kName,           // identifiers and keywords (for, in, not, true, ...)
  kString,         // text: the decoded literal
  kInteger,
  kFloat,
  kOperator,       // text: "+", "//", "==", "(", ...
  kEof,
};

struct Token {
  TokenKind kind = TokenKind::kEof;
  std::string text;
  int64_t int_value = 0;
  double float_value = 0.0;
  int line = 1;
};

// Errors carry "line N: ..." and no source name (the caller adds it).
Expected<std::vector<Token>> tokenize(std::string_view source);

}  // namespace adakv::jinja
