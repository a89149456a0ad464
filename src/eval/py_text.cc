#include "eval/py_text.h"

#include <algorithm>
#include <iterator>

#include "eval/py_unicode_tables.h"
#include "io/unicode_text.h"

namespace adakv::eval::py {
namespace {

namespace pt = py_tables;

template <size_t N>
bool in_ranges(const pt::Range (&table)[N], char32_t cp) {
  const pt::Range* end = table + N;
  const pt::Range* it = std::upper_bound(table, end, static_cast<uint32_t>(cp),
                                         [](uint32_t c, const pt::Range& r) { return c < r.first; });
  return it != table && cp <= (it - 1)->last;
}

bool is_case_ignorable(char32_t cp) { return in_ranges(pt::kCaseIgnorable, cp); }
bool is_cased_not_ignorable(char32_t cp) { return in_ranges(pt::kCasedNotIgnorable, cp); }

char32_t lower_simple(char32_t cp) {
  if (cp < 0x80) return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp;
  const pt::LowerPair* begin = std::begin(pt::kLower);
  const pt::LowerPair* end = std::end(pt::kLower);
  const pt::LowerPair* it = std::lower_bound(begin, end, static_cast<uint32_t>(cp),
                                             [](const pt::LowerPair& p, uint32_t c) { return p.cp < c; });
  return (it != end && it->cp == cp) ? static_cast<char32_t>(it->lower) : cp;
}

// CPython's handle_capital_sigma: final form when a cased letter precedes (skipping
// case-ignorable ones) and none follows.
char32_t capital_sigma(std::u32string_view s, size_t i) {
  size_t j = i;
  char32_t c = 0;
  bool found = false;
  while (j > 0) {
    c = s[--j];
    if (!is_case_ignorable(c)) {
      found = true;
      break;
    }
  }
  bool final_sigma = found && is_cased_not_ignorable(c);
  if (final_sigma && i + 1 < s.size()) {
    size_t k = i + 1;
    while (k < s.size() && is_case_ignorable(s[k])) ++k;
    final_sigma = k == s.size() || !is_cased_not_ignorable(s[k]);
  }
  return final_sigma ? 0x3C2 : 0x3C3;
}

}  // namespace

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    unsigned char b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      out.push_back(b);
      ++i;
    } else {
      out.push_back(unicode::next_code_point(s, i));
    }
  }
  return out;
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : s) unicode::append_utf8(out, cp);
  return out;
}

bool is_space(char32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x1F);
  return in_ranges(pt::kSpace, cp);
}

bool is_word(char32_t cp) {
  if (cp < 0x80) {
    return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9') || cp == '_';
  }
  return in_ranges(pt::kWord, cp);
}

bool is_decimal(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(pt::kDecimal, cp);
}

std::u32string lower(std::u32string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t c = s[i];
    if (c == 0x3A3) {
      out.push_back(capital_sigma(s, i));
    } else if (c == 0x130) {  // the one code point whose lowercase is two
      out.push_back(0x69);
      out.push_back(0x307);
    } else {
      out.push_back(lower_simple(c));
    }
  }
  return out;
}

std::string lower_utf8(std::string_view s) {
  bool ascii = std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
  if (ascii) {
    std::string out(s);
    for (char& c : out) {
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
    }
    return out;
  }
  return encode_utf8(lower(decode_utf8(s)));
}

std::vector<std::u32string_view> split_whitespace(std::u32string_view s) {
  std::vector<std::u32string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && is_space(s[i])) ++i;
    size_t start = i;
    while (i < s.size() && !is_space(s[i])) ++i;
    if (i > start) out.push_back(s.substr(start, i - start));
  }
  return out;
}

std::vector<std::u32string_view> decimal_runs(std::u32string_view s) {
  std::vector<std::u32string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    if (!is_decimal(s[i])) {
      ++i;
      continue;
    }
    size_t start = i;
    while (i < s.size() && is_decimal(s[i])) ++i;
    out.push_back(s.substr(start, i - start));
  }
  return out;
}

}  // namespace adakv::eval::py
