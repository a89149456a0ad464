#!/usr/bin/env bash
# The CUDA forward pass on the GPU machine: unpacks binaries built here with the full build
# (.carry/cudafwd.tar.xz: adakv, adakv_gpu_tests, bench_e2e, stripped; they need the CPU oracle,
# whose OpenBLAS/PCRE2 the GPU machine lacks, so they are linked statically where built, with
# cuBLASLt dynamic), runs the model-op and model tests (tests/gpu/test_model_ops.cc,
# test_cuda_model.cc), `adakv generate --device cuda` against --device cpu on the shipped model,
# then bench_e2e and its transformers peer (tools/bench/e2e_transformers.py) in the same call.
# Logs go to $OUT. Build and pack here first:
#   ninja -C build-cudafwd adakv adakv_gpu_tests bench_e2e
#   mkdir -p .carry && tar -C build-cudafwd -cJf .carry/cudafwd.tar.xz adakv tests/adakv_gpu_tests bench/bench_e2e
# Environment: ADAKV_SKIP_BENCH=1 (tests only), ADAKV_BENCH_ARGS (e.g. "--ctx 8192").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
bin=/tmp/cudafwd
gpu_carried .carry/cudafwd.tar.xz $bin
gpu_machine name,memory.total,clocks.max.sm,driver_version

echo "== tests"
timeout ${ADAKV_TEST_TIMEOUT:-200} $bin/tests/adakv_gpu_tests --gtest_filter='CudaModel*' >"$logs/model_tests.log" 2>&1
test_rc=$?
grep -E "^\[ +(OK|FAILED|SKIPPED) |^  [a-z]|Failure|differ|seed|identical" "$logs/model_tests.log" | cut -c1-240 | head -60
echo "tests: exit $test_rc, $(grep -E '^\[  PASSED|^\[  FAILED' "$logs/model_tests.log" | tr '\n' ' ') ($(( $(date +%s) - start )) s)"

echo "== generate (models/adakv-tiny-v1, greedy 40 tokens)"
gen=/tmp/adakv-gen
mkdir -p $gen
for dev in cpu cuda; do
  timeout 60 $bin/adakv generate --model models/adakv-tiny-v1 --device $dev -n 40 --ignore-eos \
    --prompt "Once upon a time, in a small village by the sea," >"$gen/$dev.txt" 2>"$gen/$dev.err"
  echo "$dev (exit $?): $(head -c 300 "$gen/$dev.txt" | tr '\n' ' ')"; grep -E "decode|prompt:|loaded" "$gen/$dev.err"
done
cmp -s "$gen/cpu.txt" "$gen/cuda.txt" && echo "generate: cpu and cuda texts identical" || echo "generate: texts differ"
for dev in cpu cuda; do
  timeout 60 $bin/adakv generate --model models/adakv-tiny-v1 --device $dev -n 40 --kv-policy ada-snapkv --kv-budget 64 \
    --prompt "$(head -c 6000 data/haystack/validation.txt)" >"$gen/ada_$dev.txt" 2>"$gen/ada_$dev.err"
  echo "$dev ada-snapkv 64 (exit $?): $(head -c 200 "$gen/ada_$dev.txt" | tr '\n' ' ')"; grep -E "kv after|decode" "$gen/ada_$dev.err"
done
cat $gen/* > "$logs/generate.log"

if [ "${ADAKV_SKIP_BENCH:-0}" != 1 ]; then
  echo "== bench_e2e"
  # shellcheck disable=SC2086
  timeout ${ADAKV_BENCH_TIMEOUT:-200} $bin/bench/bench_e2e ${ADAKV_BENCH_ARGS:-} >"$logs/bench_e2e.log" 2>&1
  echo "bench_e2e exit $? ($(( $(date +%s) - start )) s)"
  echo "== transformers peer"
  PYTHONUNBUFFERED=1 timeout ${ADAKV_PEER_TIMEOUT:-200} python3 tools/bench/e2e_transformers.py ${ADAKV_PEER_ARGS:-} >"$logs/e2e_transformers.log" 2>&1
  echo "peer exit $? ($(( $(date +%s) - start )) s)"
  tail -4 "$logs/e2e_transformers.log" | head -2
  sed -n '/^== transformers/,$p' "$logs/e2e_transformers.log"
  grep -vE "^\|" "$logs/bench_e2e.log" | tail -8
  sed -n '/^== e2e/,$p' "$logs/bench_e2e.log"
fi
[ "$test_rc" -eq 0 ]
