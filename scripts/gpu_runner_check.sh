#!/usr/bin/env bash
# The engine on the CUDA runner, on the GPU machine: unpacks .carry/runner.tar.xz (adakv and
# tests/adakv_gpu_tests, built here with the full build, stripped), runs the runner tests
# (tests/gpu/test_cuda_runner.cc) and the CudaModel tests, then `adakv bench serve --device cuda`
# with the Llama-3.1-8B-shaped random model (tools/bench/llama31_8b_shapes.json; tokenizer of
# models/adakv-tiny-v1, random prompts) under a KV limit that holds ADAKV_FULL_SEQS full requests:
# full cache, ada-snapkv and snapkv (budget 1024). Logs in $OUT; a short table last.
# Build and pack here first:
#   ninja -C build-runner adakv adakv_gpu_tests
#   mkdir -p /tmp/pack/tests && cp build-runner/adakv /tmp/pack/ && cp build-runner/tests/adakv_gpu_tests /tmp/pack/tests/
#   strip /tmp/pack/adakv /tmp/pack/tests/adakv_gpu_tests && tar -C /tmp/pack -cJf .carry/runner.tar.xz adakv tests
# Environment: ADAKV_SKIP_TESTS=1, ADAKV_SKIP_BENCH=1, ADAKV_TEST_FILTER (gtest filter; '*' runs the
# whole GPU suite), ADAKV_TEST_TIMEOUT (seconds, default 240: the whole suite took 87-104 s on an
# H200), ADAKV_SERVE_{REQUESTS,PROMPT,OUTPUT,CHUNK,FULL_SEQS,POLICIES}.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
bin=/tmp/runner
gpu_carried .carry/runner.tar.xz $bin
gpu_machine name,memory.total,clocks.max.sm,driver_version
test_rc=0
if [ "${ADAKV_SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests"
  timeout ${ADAKV_TEST_TIMEOUT:-240} $bin/tests/adakv_gpu_tests --gtest_filter="${ADAKV_TEST_FILTER:-CudaRunner*:CudaModel*}" \
    >"$logs/runner_tests.log" 2>&1
  test_rc=$?
  grep -E "^\[ +(OK|FAILED|SKIPPED) |^  [a-z%(]|Failure|diverge" "$logs/runner_tests.log" | cut -c1-220 | head -60
  echo "tests: exit $test_rc, $(grep -E '^\[  PASSED|^\[  FAILED' "$logs/runner_tests.log" | tr '\n' ' ') ($(( $(date +%s) - start )) s)"
fi

if [ "${ADAKV_SKIP_BENCH:-0}" != 1 ]; then
  N=${ADAKV_SERVE_REQUESTS:-32} P=${ADAKV_SERVE_PROMPT:-8192} O=${ADAKV_SERVE_OUTPUT:-256} C=${ADAKV_SERVE_CHUNK:-2048}
  FULL=${ADAKV_SERVE_FULL_SEQS:-4}
  # One full request: 32 layers x 8 kv heads x ceil((P + O) / 16) pages.
  pages=$(( FULL * 256 * ((P + O + 15) / 16) ))
  echo "== bench serve: $N x ($P + $O) tokens, kv limit $pages pages ($FULL full requests), chunk $C"
  for spec in ${ADAKV_SERVE_POLICIES:-full:110 ada-snapkv:60 snapkv:45}; do
    policy=${spec%%:*} cap=${spec##*:}
    extra=""
    [ "$policy" != full ] && extra="--kv-budget 1024"
    # shellcheck disable=SC2086
    timeout $cap $bin/adakv bench serve --device cuda --model models/adakv-tiny-v1 \
      --random-weights tools/bench/llama31_8b_shapes.json --prompts random -n $N --prompt-tokens $P \
      --output-tokens $O --kv-pages $pages --max-running $N --prefill-chunk $C --kv-policy $policy $extra \
      >"$logs/serve_$policy.log" 2>&1
    echo "$policy: exit $? ($(( $(date +%s) - start )) s)"; grep -vE "^RESULT" "$logs/serve_$policy.log" | tail -6
  done
  echo "== table"
  grep -h "^RESULT" "$logs"/serve_*.log
fi
[ "$test_rc" -eq 0 ]
