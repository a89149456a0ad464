#!/usr/bin/env bash
# Scoring, selection and compaction on the GPU machine: builds the CUDA kernel library and
# bench_compress_gpu from the repository alone (GPU-only build: none of the host library's
# third-party packages, which that machine lacks), builds tests/gpu/test_score_select.cc against
# the kernels and the host compress code (src/compress, src/kv, src/core: no third-party packages),
# runs the test, then the benchmark, and prints the benchmark table last. Logs go to $OUT when it
# is set. About 2-4 minutes on an H100.
#
# Environment:
#   ADAKV_GPU_BUILD_DIR      build folder (default build-gpu; kept between runs on a warm machine)
#   ADAKV_CUDA_ARCHITECTURES default 90a-real: the H100's own (the full build does 80 and 90a)
#   ADAKV_BENCH_ARGS         extra benchmark arguments, e.g. "--quick" or "--reps 10"
#   ADAKV_SKIP_BENCH=1       build and test only
#   ADAKV_TEST_SEED          reproduce a test run
# Exit status: 0 when the test passed and the benchmark ran without a mismatch.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
gpu_build_setup build-gpu
gpu_machine
gpu_configure "$logs/compress_configure.log"
: >"$logs/compress_build.log"
gpu_build "$logs/compress_build.log" bench_compress_gpu
# The test: a CMake target when gpu_only.cmake defines one, else compiled here against the kernel
# library (the test needs the host compress code, which the kernel library does not contain).
test_bin="$build/adakv_gpu_compress_tests"
if ! cmake --build "$build" -j "$(nproc)" --target adakv_gpu_compress_tests >>"$logs/compress_build.log" 2>&1; then
  cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
  if ! g++ -std=c++20 -O2 -DADAKV_HAVE_CUDA=1 -DADAKV_PLAIN_TEST_MAIN=1 -Isrc -I"$cuda_root/include" \
      tests/gpu/test_score_select.cc src/core/parallel.cc src/kv/kv_cache_manager.cc src/compress/allocators.cc \
      src/compress/compress_config.cc src/compress/kvcompress.cc src/compress/policy.cc src/compress/scorers.cc \
      "$build/cuda_kernels/libadakv_cuda_kernels.a" -L"$cuda_root/lib64" -lcudart_static -lpthread -ldl -lrt \
      -o "$test_bin" >>"$logs/compress_build.log" 2>&1; then
    grep -E "error" "$logs/compress_build.log" | head -30
    echo "FAIL: build of the test"
    exit 1
  fi
fi
# Registers, spills and shared memory of this work's kernels as built here.
awk '
  /Compiling entry function/ {
    want = match($0, /(window_stats|window_probs|window_merge|pool|critical|build_keys|head_keys|budget|flag|crit_keys|scatter_keep|compact_rows)_kernel(ILi[0-9]+ELi[0-9]+E|ILi[0-9]+E)?/)
    if (want) { name = substr($0, RSTART, RLENGTH); arch = $0; sub(/.* for /, "", arch) }
    next
  }
  want && /bytes stack frame/ { spill = $0; gsub(/^ +/, "", spill); next }
  want && /Used [0-9]+ registers/ {
    regs = $0; sub(/.*Used /, "", regs)
    printf "  %-40s %s: %s; %s\n", name, arch, regs, spill; want = 0
  }' "$logs/compress_build.log" | sort -u
echo "build: $(( $(date +%s) - start )) s"

echo "== test"
"$test_bin" >"$logs/compress_test.log" 2>&1
test_rc=$?
cat "$logs/compress_test.log" | cut -c1-400
test_line="test: exit status $test_rc ($(grep -E "passed, .* failed" "$logs/compress_test.log" | tr '\n' ' '))"
echo "$test_line"

bench_rc=0
if [ "${ADAKV_SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmark"
  # shellcheck disable=SC2086
  "$build/bench/bench_compress_gpu" ${ADAKV_BENCH_ARGS:-} >"$logs/compress_bench.log" 2>&1
  bench_rc=$?
  grep -E "^device|^gemm|^L [0-9]|^skip|CUDA call failed|failed" "$logs/compress_bench.log"
  echo "bench exit status: $bench_rc (total $(( $(date +%s) - start )) s)"
  echo "$test_line"
  if grep -q "^== scoring" "$logs/compress_bench.log"; then
    sed -n '/^== scoring/,$p' "$logs/compress_bench.log"
  else
    tail -30 "$logs/compress_bench.log"
  fi
fi
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
