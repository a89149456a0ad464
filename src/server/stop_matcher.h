// Stop strings over streamed text: the output is cut before the first occurrence of any stop
// string, even one that spans several pieces. Text that could still turn into a stop string is
// held back until it cannot; what is released never ends inside a UTF-8 character.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace adakv::server {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);

  // Adds decoded text; returns what can be released now. After a stop string is found,
  // stopped() is true and later pushes return nothing.
  std::string push(std::string_view text);
  // The held-back rest at the end of generation (nothing once stopped).
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  size_t hold_ = 0;  // longest stop string - 1: bytes that may begin a stop string
  std::string held_;
  bool stopped_ = false;
};

}  // namespace adakv::server
