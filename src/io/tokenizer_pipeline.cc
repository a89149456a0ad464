#include "io/tokenizer_pipeline.h"

#include <algorithm>
#include <array>

#include "io/unicode_text.h"

namespace adakv::tok {

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

namespace {

struct ByteTables {
  std::vector<std::string> to_unicode;  // [256] -> UTF-8
  std::array<int, 324> to_byte;         // [code point] -> byte; all mapped points are < 324
};

const ByteTables& byte_tables() {
  static const ByteTables t = [] {
    ByteTables b;
    b.to_unicode.resize(256);
    b.to_byte.fill(-1);
    int extra = 0;
    for (int byte = 0; byte < 256; ++byte) {
      bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || (byte >= 0xAE);
      char32_t cp = printable ? static_cast<char32_t>(byte) : static_cast<char32_t>(256 + extra++);
      unicode::append_utf8(b.to_unicode[byte], cp);
      b.to_byte[cp] = byte;
    }
    return b;
  }();
  return t;
}

void replace_all(std::string& s, const Pattern& pattern, std::string_view content) {
  std::vector<std::pair<size_t, size_t>> matches;
  pattern.find_all(s, matches);
  if (matches.empty()) return;
  std::string out;
  out.reserve(s.size());
  size_t prev = 0;
  for (auto [a, b] : matches) {
    out.append(s, prev, a - prev);
    out.append(content);
    prev = b;
  }
  out.append(s, prev, std::string::npos);
  s = std::move(out);
}

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

// Splits one piece at the pattern's matches as tokenizers' NormalizedString::split does.
void split_piece(const Piece& piece, const Pattern& pattern, SplitBehavior behavior, bool invert,
                 std::vector<Piece>& out) {
  const std::string& s = piece.text;
  std::vector<std::pair<size_t, size_t>> found;
  pattern.find_all(s, found);
  // [(start, end, is_match)] covering s.
  struct Span {
    size_t start, end;
    bool match;
  };
  std::vector<Span> spans;
  size_t prev = 0;
  for (auto [a, b] : found) {
    if (prev != a) spans.push_back({prev, a, invert});
    spans.push_back({a, b, !invert});
    prev = b;
  }
  if (prev != s.size()) spans.push_back({prev, s.size(), invert});

  // [(start, end, remove)]
  std::vector<Span> parts;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Span& sp : spans) parts.push_back({sp.start, sp.end, false});
      break;
    case SplitBehavior::kRemoved:
      parts = spans;
      break;
    case SplitBehavior::kContiguous: {
      bool previous = false;
      for (const Span& sp : spans) {
        if (sp.match == previous && !parts.empty()) {
          parts.back().end = sp.end;
        } else {
          parts.push_back({sp.start, sp.end, false});
        }
        previous = sp.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous = false;
      for (const Span& sp : spans) {
        if (sp.match && !previous && !parts.empty()) {
          parts.back().end = sp.end;
        } else {
          parts.push_back({sp.start, sp.end, false});
        }
        previous = sp.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->match && !previous && !parts.empty()) {
          parts.back().start = it->start;
        } else {
          parts.push_back({it->start, it->end, false});
        }
        previous = it->match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
    }
  }
  for (const Span& p : parts) {
    if (p.match || p.end == p.start) continue;  // `match` doubles as "remove" here
    out.push_back({s.substr(p.start, p.end - p.start), piece.at_start && p.start == 0});
  }
}

}  // namespace

const std::vector<std::string>& byte_to_unicode() { return byte_tables().to_unicode; }

int unicode_to_byte(char32_t cp) { return cp < 324 ? byte_tables().to_byte[cp] : -1; }

void Pattern::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  if (regex) {
    regex->find_all(s, out);
    return;
  }
  if (literal.empty()) return;
  for (size_t pos = s.find(literal); pos != std::string_view::npos; pos = s.find(literal, pos + literal.size())) {
    out.emplace_back(pos, pos + literal.size());
  }
}

void Normalizer::apply(std::string& s) const {
  switch (kind) {
    case Kind::kSequence:
      for (const Normalizer& n : children) n.apply(s);
      break;
    case Kind::kPrepend:
      if (!s.empty()) s.insert(0, text);
      break;
    case Kind::kReplace:
      replace_all(s, pattern, text);
      break;
    case Kind::kNfc:
      s = unicode::nfc(s);
      break;
    case Kind::kNfd:
      s = unicode::nfd(s);
      break;
    case Kind::kLowercase:
      s = unicode::lowercase(s);
      break;
    case Kind::kStrip: {
      size_t begin = 0, end = s.size();
      if (strip_left) {
        while (begin < end) {
          size_t i = begin;
          if (!unicode::is_whitespace(unicode::next_code_point(s, i))) break;
          begin = i;
        }
      }
      if (strip_right) {
        while (end > begin) {
          size_t start = end - 1;
          while (start > begin && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
          size_t i = start;
          if (!unicode::is_whitespace(unicode::next_code_point(s, i))) break;
          end = start;
        }
      }
      s = s.substr(begin, end - begin);
      break;
    }
  }
}

void PreTokenizer::apply(std::vector<Piece>& pieces) const {
  if (kind == Kind::kSequence) {
    for (const PreTokenizer& p : children) p.apply(pieces);
    return;
  }
  std::vector<Piece> out;
  out.reserve(pieces.size());
  for (Piece& piece : pieces) {
    switch (kind) {
      case Kind::kSequence:
        break;
      case Kind::kSplit:
        split_piece(piece, pattern, behavior, invert, out);
        break;
      case Kind::kByteLevel: {
        if (add_prefix_space && !starts_with(piece.text, " ")) piece.text = " " + piece.text;
        size_t first = out.size();
        if (use_regex) {
          split_piece(piece, pattern, SplitBehavior::kIsolated, false, out);
        } else {
          out.push_back(std::move(piece));
        }
        const auto& table = byte_to_unicode();
        for (size_t i = first; i < out.size(); ++i) {
          std::string mapped;
          mapped.reserve(out[i].text.size() * 2);
          for (unsigned char c : out[i].text) mapped += table[c];
          out[i].text = std::move(mapped);
        }
        break;
      }
      case Kind::kMetaspace: {
        Pattern space{" ", nullptr};
        replace_all(piece.text, space, replacement);
        bool prepend = prepend_scheme == PrependScheme::kAlways ||
                       (prepend_scheme == PrependScheme::kFirst && piece.at_start);
        if (prepend && !starts_with(piece.text, replacement)) piece.text.insert(0, replacement);
        if (split) {
          Pattern delimiter{replacement, nullptr};
          split_piece(piece, delimiter, SplitBehavior::kMergedWithNext, false, out);
        } else if (!piece.text.empty()) {
          out.push_back(std::move(piece));
        }
        break;
      }
    }
  }
  pieces = std::move(out);
}

void Decoder::apply(std::vector<std::string>& tokens) const {
  switch (kind) {
    case Kind::kSequence:
      for (const Decoder& d : children) d.apply(tokens);
      return;
    case Kind::kByteLevel: {
      // Per token: its bytes when every char is a mapped byte, else its own UTF-8.
      std::string bytes;
      for (const std::string& t : tokens) {
        std::string mapped;
        bool ok = true;
        for (size_t i = 0; i < t.size() && ok;) {
          int b = unicode_to_byte(unicode::next_code_point(t, i));
          if (b < 0) ok = false;
          else mapped.push_back(static_cast<char>(b));
        }
        bytes += ok ? mapped : t;
      }
      tokens.assign(1, unicode::to_valid_utf8(bytes));
      return;
    }
    case Kind::kReplace:
      for (std::string& t : tokens) replace_all(t, pattern, text);
      return;
    case Kind::kByteFallback: {
      std::vector<std::string> out;
      out.reserve(tokens.size());
      std::string pending;  // bytes of consecutive <0xNN> tokens
      auto flush = [&] {
        if (pending.empty()) return;
        if (unicode::is_valid_utf8(pending)) {
          out.push_back(pending);
        } else {
          for (size_t i = 0; i < pending.size(); ++i) out.push_back("\xEF\xBF\xBD");
        }
        pending.clear();
      };
      for (std::string& t : tokens) {
        int value = -1;
        if (t.size() == 6 && starts_with(t, "<0x") && t[5] == '>') {
          auto hex = [](char c) {
            if (c >= '0' && c <= '9') return c - '0';
            if (c >= 'a' && c <= 'f') return c - 'a' + 10;
            if (c >= 'A' && c <= 'F') return c - 'A' + 10;
            return -1;
          };
          int hi = hex(t[3]), lo = hex(t[4]);
          if (hi >= 0 && lo >= 0) value = hi * 16 + lo;
        }
        if (value >= 0) {
          pending.push_back(static_cast<char>(value));
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      tokens = std::move(out);
      return;
    }
    case Kind::kFuse: {
      std::string all;
      for (const std::string& t : tokens) all += t;
      tokens.assign(1, std::move(all));
      return;
    }
    case Kind::kStrip: {
      for (std::string& t : tokens) {
        // Works in code points; `text` holds the one character to strip.
        std::vector<std::pair<size_t, size_t>> chars;  // [(byte start, byte end)]
        for (size_t i = 0; i < t.size();) {
          size_t start = i;
          unicode::next_code_point(t, i);
          chars.emplace_back(start, i);
        }
        auto is_content = [&](size_t k) { return t.compare(chars[k].first, chars[k].second - chars[k].first, text) == 0; };
        size_t start_cut = 0, stop_cut = chars.size();
        for (size_t k = 0; k < chars.size() && k < static_cast<size_t>(strip_start) && is_content(k); ++k) start_cut = k + 1;
        for (size_t k = 0; k < static_cast<size_t>(strip_stop) && k < chars.size(); ++k) {
          size_t index = chars.size() - k - 1;
          if (!is_content(index)) break;
          stop_cut = index;
        }
        if (stop_cut <= start_cut) {
          t.clear();
        } else {
          size_t b0 = start_cut < chars.size() ? chars[start_cut].first : t.size();
          size_t b1 = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
          t = t.substr(b0, b1 - b0);
        }
      }
      return;
    }
    case Kind::kMetaspace: {
      for (size_t i = 0; i < tokens.size(); ++i) {
        std::string out;
        std::string_view t = tokens[i];
        for (size_t p = 0; p < t.size();) {
          if (!text.empty() && starts_with(t.substr(p), text)) {
            if (!(i == 0 && prepend_scheme != PrependScheme::kNever)) out.push_back(' ');
            p += text.size();
          } else {
            out.push_back(t[p++]);
          }
        }
        tokens[i] = std::move(out);
      }
      return;
    }
  }
}

}  // namespace adakv::tok
