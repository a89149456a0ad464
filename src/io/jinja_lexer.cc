#include "io/jinja_lexer.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>

#include "io/jinja_pystr.h"
#include "io/unicode_text.h"

namespace adakv::jinja {
namespace {

// jinja2 splits the source on \r\n, \r and \n, rejoins with \n and drops one trailing newline.
std::string normalize_newlines(std::string_view src) {
  std::string out;
  out.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == '\r') {
      out.push_back('\n');
      if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
    } else {
      out.push_back(src[i]);
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

class Lexer {
 public:
  explicit Lexer(std::string_view source) : s_(normalize_newlines(source)) {
    for (size_t i = 0; i < s_.size(); ++i) {
      if (s_[i] == '\n') newlines_.push_back(i);
    }
  }

  Expected<std::vector<Token>> run() {
    size_t pos = 0;
    while (pos < s_.size()) {
      size_t open = find_tag_start(pos);
      if (open == std::string::npos) {
        emit_data(pos, s_.size());
        break;
      }
      char kind = s_[open + 1];
      size_t raw_end = kind == '%' ? match_raw_begin(open) : std::string::npos;
      char sign = (open + 2 < s_.size() && (s_[open + 2] == '-' || s_[open + 2] == '+')) ? s_[open + 2] : 0;
      size_t after = open + 2 + (sign != 0 ? 1 : 0);
      emit_stripped_data(pos, open, sign, /*lstrip_allowed=*/kind != '{');
      line_starting_ = false;
      if (raw_end != std::string::npos) {
        line_starting_ = s_[raw_end - 1] == '\n';
        ADAKV_ASSIGN_OR_RETURN(pos, lex_raw(raw_end, open));
      } else if (kind == '#') {
        ADAKV_ASSIGN_OR_RETURN(pos, lex_comment(after, open));
      } else {
        ADAKV_ASSIGN_OR_RETURN(pos, lex_tag(after, open, kind == '%'));
      }
    }
    tokens_.push_back(Token{TokenKind::kEof, "", 0, 0.0, line_at(s_.size())});
    return std::move(tokens_);
  }

 private:
  int line_at(size_t pos) const {
    return 1 + static_cast<int>(std::lower_bound(newlines_.begin(), newlines_.end(), pos) - newlines_.begin());
  }
  Status error(size_t pos, const std::string& msg) const {
    return data_loss("line " + std::to_string(line_at(pos)) + ": " + msg);
  }

  size_t find_tag_start(size_t pos) const {
    for (size_t i = s_.find('{', pos); i != std::string::npos && i + 1 < s_.size(); i = s_.find('{', i + 1)) {
      char c = s_[i + 1];
      if (c == '{' || c == '%' || c == '#') return i;
    }
    return std::string::npos;
  }

  // Length of Python-whitespace (re's \s) starting at pos.
  size_t skip_space(size_t pos) const {
    while (pos < s_.size()) {
      size_t next = pos;
      char32_t cp = unicode::next_code_point(s_, next);
      if (!pystr::is_space(cp)) break;
      pos = next;
    }
    return pos;
  }

  bool only_space(size_t begin, size_t end) const { return begin < end && skip_space(begin) >= end; }

  // End of `{%[-+]? raw [-]?%}` opening at `open`, or npos. (No trim_blocks after raw's %}.)
  size_t match_raw_begin(size_t open) const {
    size_t p = open + 2;
    if (p < s_.size() && (s_[p] == '-' || s_[p] == '+')) ++p;
    p = skip_space(p);
    if (s_.compare(p, 3, "raw") != 0) return std::string::npos;
    p = skip_space(p + 3);
    if (s_.compare(p, 3, "-%}") == 0) return skip_space(p + 3);
    if (s_.compare(p, 2, "%}") == 0) return p + 2;
    return std::string::npos;
  }

  void emit_data(size_t begin, size_t end) {
    if (end > begin) tokens_.push_back(Token{TokenKind::kData, s_.substr(begin, end - begin), 0, 0.0, line_at(begin)});
  }

  // The text before a tag: `-` strips all whitespace; otherwise lstrip_blocks removes spaces
  // between a line start and a block/comment tag (jinja2's OptionalLStrip rule).
  void emit_stripped_data(size_t begin, size_t end, char sign, bool lstrip_allowed) {
    if (sign == '-') {
      size_t e = end;
      while (e > begin) {
        // Step back one code point.
        size_t b = e - 1;
        while (b > begin && (static_cast<unsigned char>(s_[b]) & 0xC0) == 0x80) --b;
        size_t probe = b;
        if (!pystr::is_space(unicode::next_code_point(s_, probe))) break;
        e = b;
      }
      emit_data(begin, e);
      return;
    }
    if (sign != '+' && lstrip_allowed && end > begin) {
      size_t nl = s_.rfind('\n', end - 1);
      size_t l_pos = (nl == std::string::npos || nl < begin) ? begin : nl + 1;
      if ((l_pos > begin || line_starting_) && only_space(l_pos, end)) {
        emit_data(begin, l_pos);
        return;
      }
    }
    emit_data(begin, end);
  }

  Expected<size_t> lex_comment(size_t p, size_t open) {
    for (; p + 1 < s_.size(); ++p) {
      size_t end = std::string::npos;
      if ((s_[p] == '+' || s_[p] == '-') && s_.compare(p + 1, 2, "#}") == 0) {
        end = s_[p] == '+' ? p + 3 : skip_space(p + 3);
      } else if (s_.compare(p, 2, "#}") == 0) {
        end = p + 2;
        if (end < s_.size() && s_[end] == '\n') ++end;
      }
      if (end != std::string::npos) {
        line_starting_ = s_[end - 1] == '\n';
        return end;
      }
    }
    return error(open, "missing end of comment tag");
  }

  Expected<size_t> lex_raw(size_t p, size_t open) {
    for (size_t q = s_.find("{%", p); q != std::string::npos; q = s_.find("{%", q + 1)) {
      size_t r = q + 2;
      char sign = 0;
      if (r < s_.size() && (s_[r] == '-' || s_[r] == '+')) sign = s_[r++];
      r = skip_space(r);
      if (s_.compare(r, 6, "endraw") != 0) continue;
      r = skip_space(r + 6);
      size_t end = std::string::npos;
      if (s_.compare(r, 3, "+%}") == 0) {
        end = r + 3;
      } else if (s_.compare(r, 3, "-%}") == 0) {
        end = skip_space(r + 3);
      } else if (s_.compare(r, 2, "%}") == 0) {
        end = r + 2;
        if (end < s_.size() && s_[end] == '\n') ++end;
      }
      if (end == std::string::npos) continue;
      emit_stripped_data(p, q, sign, true);
      line_starting_ = s_[end - 1] == '\n';
      return end;
    }
    return error(open, "missing end of raw directive");
  }

  // Tokens of a {% %} or {{ }} tag starting after its opener; returns the position after the end.
  Expected<size_t> lex_tag(size_t p, size_t open, bool block) {
    tokens_.push_back(Token{block ? TokenKind::kBlockBegin : TokenKind::kVariableBegin, "", 0, 0.0, line_at(open)});
    std::vector<char> balance;  // expected closing brackets
    while (p < s_.size()) {
      if (balance.empty()) {
        size_t end = match_tag_end(p, block);
        if (end != std::string::npos) {
          tokens_.push_back(Token{block ? TokenKind::kBlockEnd : TokenKind::kVariableEnd, "", 0, 0.0, line_at(p)});
          line_starting_ = s_[end - 1] == '\n';
          return end;
        }
      }
      size_t ws = skip_space(p);
      if (ws > p) {
        p = ws;
        continue;
      }
      ADAKV_ASSIGN_OR_RETURN(p, lex_token(p, balance));
    }
    return error(open, std::string("unexpected end of template: '") + (block ? "{%" : "{{") + "' opened here is never closed");
  }

  size_t match_tag_end(size_t p, bool block) const {
    if (block) {
      if (s_.compare(p, 3, "+%}") == 0) return p + 3;
      if (s_.compare(p, 3, "-%}") == 0) return skip_space(p + 3);
      if (s_.compare(p, 2, "%}") == 0) return (p + 2 < s_.size() && s_[p + 2] == '\n') ? p + 3 : p + 2;
      return std::string::npos;
    }
    if (s_.compare(p, 3, "-}}") == 0) return skip_space(p + 3);
    if (s_.compare(p, 2, "}}") == 0) return p + 2;
    return std::string::npos;
  }

  // `(\d+_)*\d+` at p: end position or npos.
  size_t match_digits(size_t p) const {
    if (p >= s_.size() || !is_digit(s_[p])) return std::string::npos;
    while (true) {
      while (p < s_.size() && is_digit(s_[p])) ++p;
      if (p + 1 < s_.size() && s_[p] == '_' && is_digit(s_[p + 1])) {
        ++p;
        continue;
      }
      return p;
    }
  }

  size_t match_float(size_t p) const {
    if (p > 0 && s_[p - 1] == '.') return std::string::npos;
    size_t q = match_digits(p);
    if (q == std::string::npos) return q;
    auto exponent = [&](size_t r) -> size_t {
      if (r >= s_.size() || (s_[r] != 'e' && s_[r] != 'E')) return std::string::npos;
      ++r;
      if (r < s_.size() && (s_[r] == '+' || s_[r] == '-')) ++r;
      return match_digits(r);
    };
    if (q < s_.size() && s_[q] == '.') {
      size_t frac = match_digits(q + 1);
      if (frac != std::string::npos) {
        size_t e = exponent(frac);
        return e != std::string::npos ? e : frac;
      }
    }
    return exponent(q);
  }

  size_t match_integer(size_t p, int& base) const {
    base = 10;
    if (p + 1 < s_.size() && s_[p] == '0') {
      char b = static_cast<char>(std::tolower(static_cast<unsigned char>(s_[p + 1])));
      int want = b == 'b' ? 2 : b == 'o' ? 8 : b == 'x' ? 16 : 0;
      if (want != 0) {
        size_t q = p + 2;
        auto ok = [&](char c) {
          int d = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                  : (want == 16 && std::isxdigit(static_cast<unsigned char>(c))) ? 10 : 99;
          return d < want;
        };
        size_t start = q;
        while (q < s_.size()) {
          if (s_[q] == '_' && q + 1 < s_.size() && ok(s_[q + 1])) {
            q += 2;
          } else if (ok(s_[q])) {
            ++q;
          } else {
            break;
          }
        }
        if (q > start) {
          base = want;
          return q;
        }
      }
    }
    if (p < s_.size() && s_[p] == '0') {
      size_t q = p + 1;
      while (q < s_.size() && (s_[q] == '0' || (s_[q] == '_' && q + 1 < s_.size() && s_[q + 1] == '0'))) q += s_[q] == '_' ? 2 : 1;
      return q;
    }
    return match_digits(p);
  }

  Expected<size_t> lex_token(size_t p, std::vector<char>& balance) {
    int line = line_at(p);
    char c = s_[p];
    if (size_t q = match_float(p); q != std::string::npos) {
      std::string text;
      for (size_t i = p; i < q; ++i) {
        if (s_[i] != '_') text.push_back(s_[i]);
      }
      tokens_.push_back(Token{TokenKind::kFloat, text, 0, std::strtod(text.c_str(), nullptr), line});
      return q;
    }
    int base = 10;
    if (size_t q = match_integer(p, base); q != std::string::npos) {
      std::string digits;
      for (size_t i = (base == 10 ? p : p + 2); i < q; ++i) {
        if (s_[i] != '_') digits.push_back(s_[i]);
      }
      int64_t v = 0;
      auto res = std::from_chars(digits.data(), digits.data() + digits.size(), v, base);
      if (res.ec != std::errc()) return error(p, "integer literal out of the 64-bit range");
      tokens_.push_back(Token{TokenKind::kInteger, s_.substr(p, q - p), v, 0.0, line});
      return q;
    }
    if (is_name_start(c)) {
      size_t q = p;
      while (q < s_.size() && is_name_char(s_[q])) ++q;
      tokens_.push_back(Token{TokenKind::kName, s_.substr(p, q - p), 0, 0.0, line});
      return q;
    }
    if (c == '\'' || c == '"') return lex_string(p);
    static constexpr std::string_view kTwo[] = {"**", "//", "==", "!=", ">=", "<="};
    for (std::string_view op : kTwo) {
      if (s_.compare(p, 2, op) == 0) {
        tokens_.push_back(Token{TokenKind::kOperator, std::string(op), 0, 0.0, line});
        return p + 2;
      }
    }
    if (std::string_view("+-/*%~[](){}><=.:|,;").find(c) != std::string_view::npos) {
      if (c == '(' || c == '[' || c == '{') {
        balance.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
      } else if (c == ')' || c == ']' || c == '}') {
        if (balance.empty()) return error(p, std::string("unexpected '") + c + "'");
        if (balance.back() != c) return error(p, std::string("unexpected '") + c + "', expected '" + balance.back() + "'");
        balance.pop_back();
      }
      tokens_.push_back(Token{TokenKind::kOperator, std::string(1, c), 0, 0.0, line});
      return p + 1;
    }
    size_t q = p;
    unicode::next_code_point(s_, q);
    return error(p, "unexpected char '" + s_.substr(p, q - p) + "'");
  }

  Expected<size_t> lex_string(size_t p) {
    char quote = s_[p];
    size_t q = p + 1;
    while (q < s_.size() && s_[q] != quote) q += s_[q] == '\\' ? 2 : 1;
    if (q >= s_.size()) return error(p, std::string("unexpected char '") + quote + "' (unterminated string)");
    ADAKV_ASSIGN_OR_RETURN(std::string value, unescape(p + 1, q));
    tokens_.push_back(Token{TokenKind::kString, std::move(value), 0, 0.0, line_at(p)});
    return q + 1;
  }

  // Python's unicode-escape decoding of a literal's body (what jinja2 applies).
  Expected<std::string> unescape(size_t b, size_t e) const {
    std::string out;
    auto hex = [&](size_t at, int n, char32_t& cp) {
      if (at + n > e) return false;
      cp = 0;
      for (int i = 0; i < n; ++i) {
        char c = s_[at + i];
        if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
        cp = cp * 16 + static_cast<char32_t>(std::isdigit(static_cast<unsigned char>(c)) ? c - '0' : (std::tolower(c) - 'a' + 10));
      }
      return true;
    };
    for (size_t i = b; i < e; ++i) {
      if (s_[i] != '\\') {
        out.push_back(s_[i]);
        continue;
      }
      char c = s_[++i];
      char32_t cp = 0;
      switch (c) {
        case '\n': break;
        case '\\': out.push_back('\\'); break;
        case '\'': out.push_back('\''); break;
        case '"': out.push_back('"'); break;
        case 'a': out.push_back('\a'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'v': out.push_back('\v'); break;
        case 'x':
        case 'u':
        case 'U': {
          int n = c == 'x' ? 2 : c == 'u' ? 4 : 8;
          if (!hex(i + 1, n, cp) || cp > 0x10FFFF) return error(i, std::string("truncated \\") + c + " escape in string literal");
          unicode::append_utf8(out, cp);
          i += n;
          break;
        }
        case 'N': return error(i, "\\N{...} escapes in string literals are not supported");
        default:
          if (c >= '0' && c <= '7') {
            int n = 0;
            while (n < 3 && i + n < e && s_[i + n] >= '0' && s_[i + n] <= '7') cp = cp * 8 + (s_[i + n++] - '0');
            unicode::append_utf8(out, cp);
            i += n - 1;
          } else {
            out.push_back('\\');  // Python keeps unknown escapes as written
            out.push_back(c);
          }
      }
    }
    return out;
  }

  std::string s_;
  std::vector<size_t> newlines_;  // positions of '\n' in s_, for line numbers
  std::vector<Token> tokens_;
  bool line_starting_ = true;     // did the previous match end with a newline (jinja2's flag)
};

}  // namespace

Expected<std::vector<Token>> tokenize(std::string_view source) { return Lexer(source).run(); }

}  // namespace adakv::jinja
