#!/usr/bin/env bash
# Builds every libFuzzer target in fuzz/*.cc with clang (ASan + UBSan, the library instrumented
# for coverage) and runs each for a bounded time.
#   usage: tools/run_fuzzers.sh [SECONDS_PER_TARGET]   (default 30)
#   env:   ADAKV_FUZZ_BUILD_DIR (default <repo>/build-fuzz), ADAKV_FUZZ_JOBS (ninja -j, default 2)
# Optional per target: seeds in fuzz/corpus/<target>/, a dictionary in fuzz/<target>.dict.
# Exits non-zero when a target fails to build or finds a crash, leak, timeout or UB; the input
# that triggered it is kept under <build>/fuzz-artifacts/<target>/.
set -euo pipefail

secs="${1:-30}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [seconds per target]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${ADAKV_FUZZ_BUILD_DIR:-$root/build-fuzz}"
jobs="${ADAKV_FUZZ_JOBS:-2}"

shopt -s nullglob
targets=()
for src in "$root"/fuzz/*.cc; do targets+=("$(basename "$src" .cc)"); done
if [[ ${#targets[@]} -eq 0 ]]; then
  echo "run_fuzzers: no targets in $root/fuzz" >&2
  exit 1
fi

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DADAKV_FUZZ=ON -DADAKV_STATIC_DEPS=OFF -DADAKV_CUDA=OFF -DADAKV_TESTS=OFF -DADAKV_BENCH=OFF >/dev/null
ninja -C "$build" -j "$jobs" "${targets[@]}"

failed=()
for t in "${targets[@]}"; do
  corpus="$build/fuzz-corpus/$t"        # grows across runs; new finds are written here
  artifacts="$build/fuzz-artifacts/$t/"
  log="$build/fuzz-$t.log"
  mkdir -p "$corpus" "$artifacts"
  extra=()
  [[ -d "$root/fuzz/corpus/$t" ]] && extra+=("$root/fuzz/corpus/$t")
  [[ -f "$root/fuzz/$t.dict" ]] && extra=("-dict=$root/fuzz/$t.dict" "${extra[@]}")
  echo "== $t: ${secs}s"
  if "$build/fuzz/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$artifacts" "$corpus" "${extra[@]}" >"$log" 2>&1; then
    echo "   ok: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs," \
         "corpus $(find "$corpus" -type f | wc -l) inputs"
  else
    echo "   FAILED: see $log and $artifacts" >&2
    tail -n 40 "$log" >&2
    failed+=("$t")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "run_fuzzers: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "run_fuzzers: all ${#targets[@]} target(s) ran ${secs}s without a crash"
