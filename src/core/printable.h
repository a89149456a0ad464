// Text from files we did not write (tensor names, config strings) quoted in error messages: kept
// on one line (control bytes as \xNN) and cut to a bounded length ("..." marks the cut).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace adakv {

inline std::string printable(std::string_view s, size_t max_chars) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_chars; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > max_chars) out += "...";
  return out;
}

}  // namespace adakv
