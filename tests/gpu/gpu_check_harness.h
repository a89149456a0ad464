// The harness of the kernel tests in tests/gpu (decode and prefill attention, scoring and
// selection): each file lists named checks, each check returns a CheckResult, and
// ADAKV_RUN_CHECKS(suite) at the end of the file either registers one GoogleTest per check (so
// ctest lists them by name) or, with ADAKV_PLAIN_TEST_MAIN, defines a main() that runs them all,
// for a GPU machine that has no GoogleTest libraries (scripts/gpu_*_check.sh build them so).
// Include it first; the file then defines `std::vector<NamedCheck> all_checks()` in an
// anonymous namespace.
#pragma once

#if !ADAKV_PLAIN_TEST_MAIN
#include <gtest/gtest.h>
#endif

#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace {

// Outcome of one check: skipped with a reason, or failed with a message, or passed.
struct CheckResult {
  bool skipped = false;
  std::string message;  // the skip reason or the failure; empty on a pass
  std::string info;     // printed in any case (errors measured, seed)
  bool passed() const { return !skipped && message.empty(); }
};

struct NamedCheck {
  std::string name;
  std::function<CheckResult()> fn;
};

std::vector<NamedCheck> all_checks();

#if ADAKV_PLAIN_TEST_MAIN
inline int run_checks_main() {
  int passed = 0, failed = 0, skipped = 0;
  for (const NamedCheck& c : all_checks()) {
    const CheckResult r = c.fn();
    if (r.skipped) {
      ++skipped;
      std::printf("SKIP %s: %s\n", c.name.c_str(), r.message.c_str());
    } else if (!r.message.empty()) {
      ++failed;
      std::printf("FAIL %s: %s\n", c.name.c_str(), r.message.c_str());
    } else {
      ++passed;
      std::printf("PASS %s%s%s\n", c.name.c_str(), r.info.empty() ? "" : ": ", r.info.c_str());
    }
    std::fflush(stdout);
  }
  std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return failed == 0 ? 0 : 1;
}
#define ADAKV_RUN_CHECKS(suite) \
  int main() { return run_checks_main(); }
#else
// One gtest per check, registered at start-up.
inline bool register_checks(const char* suite) {
  for (const NamedCheck& c : all_checks()) {
    testing::RegisterTest(suite, c.name.c_str(), nullptr, nullptr, __FILE__, __LINE__, [c]() -> testing::Test* {
      struct Body : testing::Test {
        NamedCheck check;
        explicit Body(NamedCheck nc) : check(std::move(nc)) {}
        void TestBody() override {
          const CheckResult r = check.fn();
          if (r.skipped) GTEST_SKIP() << r.message;
          if (!r.info.empty()) std::printf("  %s\n", r.info.c_str());
          EXPECT_TRUE(r.message.empty()) << r.message;
        }
      };
      return new Body(c);
    });
  }
  return true;
}
#define ADAKV_RUN_CHECKS(suite) \
  namespace {                   \
  const bool kRegistered = register_checks(suite); \
  }
#endif

}  // namespace
