#include "io/unicode_text.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "io/unicode_tables.h"

namespace adakv::unicode {
namespace {

namespace ut = unicode_tables;

// Hangul syllable arithmetic (Unicode §3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
              kSCount = kLCount * kNCount;

const ut::Decomp* find_decomp(char32_t cp) {
  const auto* begin = std::begin(ut::kCanonicalDecomp);
  const auto* end = std::end(ut::kCanonicalDecomp);
  const auto* it = std::lower_bound(begin, end, cp, [](const ut::Decomp& d, char32_t c) { return d.cp < c; });
  return (it != end && it->cp == cp) ? it : nullptr;
}

uint8_t combining_class(char32_t cp) {
  if (cp < 0x300) return 0;
  const auto* begin = std::begin(ut::kCombiningClass);
  const auto* end = std::end(ut::kCombiningClass);
  const auto* it = std::upper_bound(begin, end, cp, [](char32_t c, const ut::CccRange& r) { return c < r.first; });
  if (it == begin) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

// Composition pairs sorted by (first, second) -> composite; built once from the decomposition table.
struct Composition {
  uint64_t key;
  char32_t composite;
};
const std::vector<Composition>& compositions() {
  static const std::vector<Composition> table = [] {
    std::vector<Composition> t;
    for (const auto& d : ut::kCanonicalDecomp) {
      if (d.second & 0x80000000u) {
        t.push_back({(uint64_t{d.first} << 32) | (d.second & 0x7FFFFFFFu), d.cp});
      }
    }
    std::sort(t.begin(), t.end(), [](const Composition& a, const Composition& b) { return a.key < b.key; });
    return t;
  }();
  return table;
}

char32_t compose_pair(char32_t a, char32_t b) {
  // Hangul LV and LVT.
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    return a + (b - kTBase);
  }
  const auto& t = compositions();
  uint64_t key = (uint64_t{a} << 32) | b;
  auto it = std::lower_bound(t.begin(), t.end(), key, [](const Composition& c, uint64_t k) { return c.key < k; });
  return (it != t.end() && it->key == key) ? it->composite : 0;
}

void decompose_into(char32_t cp, std::vector<char32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    int s = static_cast<int>(cp - kSBase);
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  const ut::Decomp* d = cp >= 0xC0 ? find_decomp(cp) : nullptr;
  if (d == nullptr) {
    out.push_back(cp);
    return;
  }
  decompose_into(d->first, out);
  char32_t second = d->second & 0x7FFFFFFFu;
  if (second != 0) decompose_into(second, out);
}

// Canonical decomposition followed by canonical ordering: [code points].
std::vector<char32_t> decompose(std::string_view s) {
  std::vector<char32_t> cps;
  cps.reserve(s.size());
  for (size_t i = 0; i < s.size();) decompose_into(next_code_point(s, i), cps);
  // Stable sort of each run of non-starters by combining class (runs are short).
  for (size_t i = 0; i < cps.size();) {
    if (combining_class(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && combining_class(cps[j]) != 0) ++j;
    std::stable_sort(cps.begin() + i, cps.begin() + j,
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  return cps;
}

bool below_u0300(std::string_view s) {
  // Every code point >= U+0300 starts with a byte >= 0xCC.
  for (unsigned char c : s) {
    if (c >= 0xCC) return false;
  }
  return true;
}

}  // namespace

char32_t next_code_point(std::string_view s, size_t& i) {
  auto byte = [&](size_t k) -> unsigned { return static_cast<unsigned char>(s[k]); };
  unsigned b0 = byte(i);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  size_t need;
  unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  char32_t cp;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    ++i;
    return kReplacementChar;
  }
  size_t k = i + 1;
  for (size_t n = 0; n < need; ++n, ++k) {
    unsigned lo_n = n == 0 ? lo : 0x80, hi_n = n == 0 ? hi : 0xBF;
    if (k >= s.size() || byte(k) < lo_n || byte(k) > hi_n) {
      i = k;  // the maximal invalid prefix is replaced by one U+FFFD
      return kReplacementChar;
    }
    cp = (cp << 6) | (byte(k) & 0x3F);
  }
  i = k;
  return cp;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t start = i;
    char32_t cp = next_code_point(s, i);
    // A genuine U+FFFD is three bytes EF BF BD; an error consumes a different count or bytes.
    if (cp == kReplacementChar && (i - start != 3 || s.substr(start, 3) != "\xEF\xBF\xBD")) return false;
  }
  return true;
}

std::string to_valid_utf8(std::string_view s) {
  if (is_valid_utf8(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) append_utf8(out, next_code_point(s, i));
  return out;
}

bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

std::string nfd(std::string_view s) {
  // Below U+0080 nothing decomposes (precomposed Latin-1 letters do, so no U+0300 shortcut here).
  if (std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; })) {
    return std::string(s);
  }
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : decompose(s)) append_utf8(out, cp);
  return out;
}

std::string nfc(std::string_view s) {
  if (below_u0300(s) && is_valid_utf8(s)) return std::string(s);
  std::vector<char32_t> cps = decompose(s);
  // Canonical composition: each character combines with the last starter unless blocked.
  size_t starter = SIZE_MAX;
  int last_ccc = -1;
  size_t w = 0;
  for (size_t r = 0; r < cps.size(); ++r) {
    char32_t c = cps[r];
    int ccc = combining_class(c);
    if (starter != SIZE_MAX) {
      bool blocked = last_ccc != -1 && (last_ccc == 0 || last_ccc >= ccc);
      if (!blocked) {
        if (char32_t comp = compose_pair(cps[starter], c)) {
          cps[starter] = comp;
          continue;
        }
      }
    }
    if (ccc == 0) {
      starter = w;
      last_ccc = -1;
    } else {
      last_ccc = ccc;
    }
    cps[w++] = c;
  }
  cps.resize(w);
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : cps) append_utf8(out, cp);
  return out;
}

std::string lowercase(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    char32_t cp = next_code_point(s, i);
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp));
      continue;
    }
    if (cp == 0x130) {  // İ -> i + combining dot above
      append_utf8(out, 'i');
      append_utf8(out, 0x307);
      continue;
    }
    const auto* begin = std::begin(ut::kLowercase);
    const auto* end = std::end(ut::kLowercase);
    const auto* it = std::lower_bound(begin, end, cp, [](const ut::Lower& l, char32_t c) { return l.cp < c; });
    append_utf8(out, (it != end && it->cp == cp) ? it->lower : cp);
  }
  return out;
}

}  // namespace adakv::unicode
