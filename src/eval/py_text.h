// The bits of Python 3's str and re behaviour that LongBench's and RULER's scoring code relies on,
// so that adakv's metrics give the same numbers as the Python scripts people compare against:
// str.lower() (full mapping, final sigma), str.split() with no argument, str.isspace(), and the
// character classes \w and \d of re for str patterns. Strings are code-point sequences, as in
// Python. Tables: py_unicode_tables.h (generated from Python 3.11, Unicode 14.0).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace adakv::eval::py {

// Code points of UTF-8 text; an invalid sequence becomes U+FFFD (JSON input is valid UTF-8).
std::u32string decode_utf8(std::string_view s);
std::string encode_utf8(std::u32string_view s);

bool is_space(char32_t cp);    // str.isspace()
bool is_word(char32_t cp);     // re's \w: str.isalnum() or '_'
bool is_decimal(char32_t cp);  // re's \d: str.isdecimal()

// str.lower(): per-code-point full lowercase mapping, plus the Final_Sigma rule for U+03A3.
std::u32string lower(std::u32string_view s);
std::string lower_utf8(std::string_view s);

// str.split() without arguments: runs of is_space separate, no empty pieces.
std::vector<std::u32string_view> split_whitespace(std::u32string_view s);

// re.findall(r"\d+", s).
std::vector<std::u32string_view> decimal_runs(std::u32string_view s);

}  // namespace adakv::eval::py
