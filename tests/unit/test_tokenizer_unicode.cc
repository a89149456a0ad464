// The Unicode pieces of the tokenizer against values from the Unicode standard (canonical
// decompositions, composition exclusions, canonical ordering, Hangul arithmetic) and the
// WHATWG / Rust "maximal subpart" rule for repairing invalid UTF-8.
#include <gtest/gtest.h>

#include <string>

#include "io/unicode_text.h"

namespace adakv {
namespace {

std::string u8(std::u32string_view cps) {
  std::string out;
  for (char32_t c : cps) unicode::append_utf8(out, c);
  return out;
}

TEST(TokenizerUnicode, NfcComposes) {
  EXPECT_EQ(unicode::nfc(u8(U"e\u0301")), u8(U"\u00E9"));
  // U+212B ANGSTROM SIGN is a singleton: its NFC is U+00C5.
  EXPECT_EQ(unicode::nfc(u8(U"\u212B")), u8(U"\u00C5"));
  // Canonical ordering puts dot below (ccc 220) before circumflex (230), then both compose.
  EXPECT_EQ(unicode::nfc(u8(U"a\u0302\u0323")), u8(U"\u1EAD"));
  // Two-step composition: A + ring -> Å, + acute -> Ǻ.
  EXPECT_EQ(unicode::nfc(u8(U"A\u030A\u0301")), u8(U"\u01FA"));
  // Hangul L V T jamo compose arithmetically to 한.
  EXPECT_EQ(unicode::nfc(u8(U"\u1112\u1161\u11AB")), u8(U"\uD55C"));
  // U+0958 DEVANAGARI QA is a composition exclusion: stays decomposed.
  EXPECT_EQ(unicode::nfc(u8(U"\u0958")), u8(U"\u0915\u093C"));
  // No composite for q + dot above; marks reordered by class only.
  EXPECT_EQ(unicode::nfc(u8(U"q\u0307\u0323")), u8(U"q\u0323\u0307"));
  EXPECT_EQ(unicode::nfc("plain ascii"), "plain ascii");
}

TEST(TokenizerUnicode, NfdDecomposes) {
  EXPECT_EQ(unicode::nfd(u8(U"\u01FA")), u8(U"A\u030A\u0301"));
  EXPECT_EQ(unicode::nfd(u8(U"\uD55C")), u8(U"\u1112\u1161\u11AB"));
  EXPECT_EQ(unicode::nfd(u8(U"\u1EAD")), u8(U"a\u0323\u0302"));
}

TEST(TokenizerUnicode, LowercasePerCodePoint) {
  EXPECT_EQ(unicode::lowercase("ABC xyz"), "abc xyz");
  EXPECT_EQ(unicode::lowercase(u8(U"\u00C9\u0391\u03A3")), u8(U"\u00E9\u03B1\u03C3"));  // ÉΑΣ -> éασ
  EXPECT_EQ(unicode::lowercase(u8(U"\u0130")), u8(U"i\u0307"));  // İ has a two-code-point lowercase
}

TEST(TokenizerUnicode, InvalidUtf8BecomesReplacementPerMaximalSubpart) {
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(unicode::to_valid_utf8("a\xFF" "b"), "a" + r + "b");
  EXPECT_EQ(unicode::to_valid_utf8("\xE2\x82"), r);          // truncated 3-byte sequence: one
  EXPECT_EQ(unicode::to_valid_utf8("\xE2\x82x"), r + "x");
  EXPECT_EQ(unicode::to_valid_utf8("\xF0\x9F\x98"), r);
  EXPECT_EQ(unicode::to_valid_utf8("\xED\xA0\x80"), r + r + r);  // surrogate: each byte
  EXPECT_EQ(unicode::to_valid_utf8("\xC0\xAF"), r + r);          // overlong
  EXPECT_EQ(unicode::to_valid_utf8("\xF4\x90\x80\x80"), r + r + r + r);  // above U+10FFFF
  EXPECT_TRUE(unicode::is_valid_utf8(u8(U"\uFFFD\U0001F600")));
  EXPECT_FALSE(unicode::is_valid_utf8("\xF0\x9F\x98"));
}

TEST(TokenizerUnicode, WhiteSpaceProperty) {
  for (char32_t c : {U' ', U'\t', U'\n', U'\r', U'\u0085', U'\u00A0', U'\u2009', U'\u2028', U'\u3000'}) {
    EXPECT_TRUE(unicode::is_whitespace(c)) << static_cast<uint32_t>(c);
  }
  for (char32_t c : {U'a', U'\u200B', U'\u180E', U'\uFEFF'}) EXPECT_FALSE(unicode::is_whitespace(c));
}

}  // namespace
}  // namespace adakv
