#!/usr/bin/env bash
# The server under AddressSanitizer + UBSan: builds adakv and the unit tests with
# -DADAKV_SANITIZE=ON in build-asan-server/, then runs the HTTP/API unit tests and the whole
# tests/server suite (the real `adakv serve`, openai client, curl, 64 concurrent streams)
# against the instrumented binary. Any sanitizer report fails the run.
#   usage: scripts/test_server_asan.sh        env: ADAKV_ASAN_BUILD_DIR, ADAKV_JOBS (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
build="${ADAKV_ASAN_BUILD_DIR:-build-asan-server}"
py="build-venv/bin/python"
[ -x "$py" ] || { echo "test_server_asan: $py missing: run scripts/install_deps.sh" >&2; exit 1; }

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DADAKV_SANITIZE=ON -DADAKV_CUDA=OFF \
  -DADAKV_BENCH=OFF >/dev/null
# halt_on_error: the first report ends the process, so a test sees a non-zero exit or a dropped
# connection; UBSan reports abort too.
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:exitcode=66"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=67"
jobs="${ADAKV_JOBS:-2}"
ninja -C "$build" -j "$jobs" adakv
ADAKV_BINARY="$build/adakv" ADAKV_TEST_SLOWDOWN=4 "$py" -m pytest -q tests/server
ninja -C "$build" -j "$jobs" adakv_unit_tests
"$build/tests/adakv_unit_tests" --gtest_filter='Http*:ServerApi*:ServerMetrics*:StopMatcher*:TokenizerStream*'
