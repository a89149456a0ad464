// Python's str operations on UTF-8 text, for the chat-template renderer: templates index, slice,
// strip and split by code point with Python's rules, and print values with Python's repr.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace adakv::jinja::pystr {

// Code points of `s` (invalid UTF-8 becomes U+FFFD) and back.
std::u32string decode(std::string_view s);
std::string encode(std::u32string_view s);
// len(s) in code points.
size_t length(std::string_view s);

// str.isspace() for one code point (also what Python's re `\s` matches in str patterns).
bool is_space(char32_t cp);

// s.strip(chars), s.lstrip(chars), s.rstrip(chars); chars == nullopt strips whitespace.
std::string strip(std::string_view s, const std::optional<std::string>& chars, bool left, bool right);
// s.split(sep, maxsplit) and s.rsplit(...); sep == nullopt splits on whitespace runs.
// An empty sep is a ValueError in Python: the caller checks.
std::vector<std::string> split(std::string_view s, const std::optional<std::string>& sep, int64_t maxsplit);
std::vector<std::string> rsplit(std::string_view s, const std::optional<std::string>& sep, int64_t maxsplit);
// s.splitlines() (without keepends).
std::vector<std::string> splitlines(std::string_view s);
// s.replace(old, new, count); count < 0 replaces all. An empty `old` inserts between code points.
std::string replace(std::string_view s, std::string_view old_text, std::string_view new_text, int64_t count);
// s.find(sub) in code points, -1 when absent.
int64_t find(std::string_view s, std::string_view sub, bool reverse);
int64_t count(std::string_view s, std::string_view sub);

// Case mapping: lower() uses the full Unicode lowercase mapping; upper(), title() and
// capitalize() map ASCII and Latin-1 only (non-Latin scripts pass through unchanged).
std::string lower(std::string_view s);
std::string upper(std::string_view s);
std::string title(std::string_view s);
std::string capitalize(std::string_view s);
bool is_lower(std::string_view s);  // str.islower(), ASCII/Latin-1 cased letters
bool is_upper(std::string_view s);

// repr(s): single quotes unless s has a single quote and no double quote; escapes as CPython.
std::string repr(std::string_view s);
// repr(f) for a float: shortest round-trip digits, '1e+16' / '1.5e-05' / '2.0' forms.
std::string float_repr(double f);
// A JSON string literal as Python's json.dumps writes it.
std::string json_quote(std::string_view s, bool ensure_ascii);

}  // namespace adakv::jinja::pystr
