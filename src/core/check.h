// ADAKV_CHECK: broken invariants (programming errors), never user input. Aborts with file,
// line, expression and message.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace adakv::detail {
[[noreturn]] inline void check_failed(const char* file, int line, const char* expr, const char* msg) {
  std::fprintf(stderr, "adakv: internal check failed at %s:%d: %s (%s)\n", file, line, expr, msg);
  std::abort();
}
}  // namespace adakv::detail

#define ADAKV_CHECK(cond, msg)                                                    \
  do {                                                                            \
    if (!(cond)) ::adakv::detail::check_failed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)
