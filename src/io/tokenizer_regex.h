// PCRE2 (UTF + Unicode properties, JIT when available) for the split and replace patterns of
// tokenizer.json, which Hugging Face evaluates with Oniguruma.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"

namespace adakv::tok {

class Regex {
 public:
  // `pattern` in Oniguruma syntax as tokenizer.json stores it; the error names the pattern.
  static Expected<std::shared_ptr<const Regex>> compile(std::string_view pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the non-overlapping leftmost matches in `s` (valid UTF-8) as [start, end) byte
  // ranges; after an empty match the search resumes one character later, as Oniguruma's
  // find_iter does. A match that exceeds PCRE2's resource limits ends the search.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  Regex() = default;
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

// Oniguruma's \s also matches U+0085 (NEL), PCRE2's does not: rewrites \s and \S accordingly.
std::string onig_to_pcre2(std::string_view pattern);

}  // namespace adakv::tok
