#!/usr/bin/env bash
# Device compression of h2o, kvcompress, criticalkv and ada-criticalkv (CudaModel / CUDA runner),
# on the GPU machine: unpacks .carry/metricpol.tar.xz (adakv and tests/adakv_gpu_tests, built here
# with the full build in build-runner, stripped), runs the new tests, then the rest of the
# CudaModel / CudaRunner suites, then `adakv generate` on cpu and cuda for each policy.
# Build and pack here first:
#   ninja -C build-runner adakv adakv_gpu_tests
#   mkdir -p /tmp/pack_mp/tests && cp build-runner/adakv /tmp/pack_mp/ && cp build-runner/tests/adakv_gpu_tests /tmp/pack_mp/tests/
#   strip /tmp/pack_mp/adakv /tmp/pack_mp/tests/adakv_gpu_tests && tar -C /tmp/pack_mp -cJf .carry/metricpol.tar.xz adakv tests
# Environment: ADAKV_TEST_FILTER (first run), ADAKV_REST_FILTER (second), ADAKV_SKIP_REST=1, ADAKV_SKIP_GEN=1.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
bin=/tmp/metricpol
gpu_carried .carry/metricpol.tar.xz $bin
gpu_machine name,memory.total,driver_version
summ() { grep -E "^\[ +(OK|FAILED|SKIPPED) |^  [a-z%(]|Failure|Expected|Which is|differ" "$1" | cut -c1-260 | head -${2:-60}; }
first=${ADAKV_TEST_FILTER:-CudaModel.MetricAndCritical*:CudaModel.ContinualMetric*:CudaRunner.MetricPolicies*:CudaModel.CompressedGenerate*}
echo "== new tests"
timeout ${ADAKV_TEST_TIMEOUT:-100} $bin/tests/adakv_gpu_tests --gtest_filter="$first" >"$logs/new_tests.log" 2>&1
rc1=$?
summ "$logs/new_tests.log" 70
echo "new tests: exit $rc1 $(grep -E '^\[  PASSED|^\[  FAILED' "$logs/new_tests.log" | tr '\n' ' ') ($(( $(date +%s) - start )) s)"
rc2=0
if [ "${ADAKV_SKIP_REST:-0}" != 1 ]; then
  echo "== rest of CudaModel / CudaRunner"
  timeout ${ADAKV_REST_TIMEOUT:-80} $bin/tests/adakv_gpu_tests \
    --gtest_filter="${ADAKV_REST_FILTER:-CudaModel*:CudaRunner*:-$first}" >"$logs/rest_tests.log" 2>&1
  rc2=$?
  summ "$logs/rest_tests.log" 40
  echo "rest: exit $rc2 $(grep -E '^\[  PASSED|^\[  FAILED' "$logs/rest_tests.log" | tr '\n' ' ') ($(( $(date +%s) - start )) s)"
fi
if [ "${ADAKV_SKIP_GEN:-0}" != 1 ]; then
  echo "== generate (adakv-tiny-v1, haystack prompt, budget 64, 24 tokens)"
  gen=$logs/gen; mkdir -p $gen
  for pol in h2o kvcompress criticalkv ada-criticalkv; do
    for dev in cpu cuda; do
      timeout 30 $bin/adakv generate --model models/adakv-tiny-v1 --device $dev -n 24 --ignore-eos --kv-policy $pol \
        --kv-budget 64 --prompt "$(head -c 4000 data/haystack/validation.txt)" >"$gen/${pol}_$dev.txt" 2>"$gen/${pol}_$dev.err"
      echo "$pol $dev (exit $?): $(head -c 120 "$gen/${pol}_$dev.txt" | tr '\n' ' ') | $(grep -E "kv after|kv:" "$gen/${pol}_$dev.err" | tr '\n' ' ' | cut -c1-160)"
      grep -iE "error|unimpl" "$gen/${pol}_$dev.err" | head -2
    done
  done
fi
echo "SUMMARY new=$rc1 rest=$rc2 total $(( $(date +%s) - start )) s"
[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
