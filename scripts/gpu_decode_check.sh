#!/usr/bin/env bash
# Decode attention on the GPU machine: builds the CUDA kernel library, its test and its benchmark
# from the repository alone (GPU-only build: none of the host library's third-party packages,
# which that machine lacks), runs the test, then the benchmark, and prints the benchmark table
# last. Logs and the full CSV go to $OUT when it is set. About 2-4 minutes on an H100.
#
# Environment:
#   ADAKV_GPU_BUILD_DIR      build folder (default build-gpu; kept between runs on a warm machine)
#   ADAKV_CUDA_ARCHITECTURES default 90a-real: the H100's own (the full build does 80 and 90a)
#   ADAKV_BENCH_ARGS         extra benchmark arguments, e.g. "--quick" or "--reps 10"
#   ADAKV_SKIP_BENCH=1       build and test only
#   ADAKV_GPU_PREBUILT=DIR   skip the build: run DIR/adakv_gpu_kernel_tests and
#                            DIR/bench_decode_attention (built elsewhere with nvcc for sm_90a and
#                            carried, e.g. unpacked from .carry/decode3.tar.xz)
# Exit status: 0 when the test passed and the benchmark ran without a mismatch.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
gpu_build_setup build-gpu
gpu_machine

if [ -n "${ADAKV_GPU_PREBUILT:-}" ]; then
  echo "== prebuilt binaries from $ADAKV_GPU_PREBUILT (no build here)"
  test_bin="$ADAKV_GPU_PREBUILT/adakv_gpu_kernel_tests"
  bench_bin="$ADAKV_GPU_PREBUILT/bench_decode_attention"
else
test_bin="$build/adakv_gpu_kernel_tests"
bench_bin="$build/bench/bench_decode_attention"
gpu_configure "$logs/configure.log"
: >"$logs/build.log"
gpu_build "$logs/build.log" adakv_gpu_kernel_tests bench_decode_attention
# Registers, spills and shared memory of the decode kernels as built here.
awk '
  /Compiling entry function .*decode_(attention|merge)_kernel/ {
    name = $0
    sub(/.*decode_detail[0-9]+/, "", name); sub(/EEEvNS.*/, "", name)
    gsub(/E13__nv_bfloat16L/, " q bf16 L", name); gsub(/EfL/, " q f32 L", name)
    sub(/ILi/, " d", name); gsub(/ELi|Li|E/, " ", name)
    arch = $0; sub(/.* for /, "", arch); want = 1; next
  }
  want && /bytes stack frame/ { spill = $0; gsub(/^ +/, "", spill); next }
  want && /Used [0-9]+ registers/ {
    regs = $0; sub(/.*Used /, "", regs); sub(/, used [0-9]+ barriers/, "", regs)
    sub(/ bytes stack frame, /, " B stack, ", spill); sub(/ bytes spill stores, /, " B spill st, ", spill)
    sub(/ bytes spill loads/, " B spill ld", spill)
    printf "  %-34s %s: %s; %s\n", name, arch, regs, spill; want = 0
  }' "$logs/build.log" | sort -u
echo "build: $(( $(date +%s) - start )) s"
fi

echo "== test"
"$test_bin" >"$logs/test.log" 2>&1
test_rc=$?
# Failures, skips and the measured errors; gtest's per-test RUN/OK lines are left in the log.
grep -E "FAIL|SKIP|Skipped|max relative|error|passed|PASSED|tests ran" "$logs/test.log" | grep -vE "^\[ RUN" | tail -30
test_line="test: exit status $test_rc ($(grep -E "passed, .* failed|PASSED|FAILED  \] [0-9]" "$logs/test.log" | tr '\n' ' '))"
echo "$test_line"

bench_rc=0
if [ "${ADAKV_SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmark"
  # shellcheck disable=SC2086
  OUT="$logs" "$bench_bin" ${ADAKV_BENCH_ARGS:-} >"$logs/bench.log" 2>&1
  bench_rc=$?
  grep -E "^device|^copy|^KV pool|warp slots|^skip|CUDA call failed|^create|^plan|^run" "$logs/bench.log"
  echo "bench exit status: $bench_rc (total $(( $(date +%s) - start )) s)"
  echo "$test_line"
  if grep -q "^== decode attention" "$logs/bench.log"; then
    sed -n '/^== sweep/,/^done /p' "$logs/bench.log" | grep -v "^done "
    sed -n '/^== decode attention/,$p' "$logs/bench.log"
  else
    tail -30 "$logs/bench.log"
  fi
fi
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
