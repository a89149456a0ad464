#!/usr/bin/env bash
# Prefill attention on the GPU machine: builds the CUDA kernel library and the prefill benchmark
# with the GPU-only path (none of the host library's third-party packages, which that machine
# lacks), builds and runs tests/gpu/test_prefill_attention.cc (CPU fp64 oracle), then the C++
# benchmark and the PyTorch SDPA flash peer on the same shapes, and prints ONE comparison table
# last. Full logs and CSVs go to $OUT when it is set. About 2-3 minutes on an H100.
#
# Environment:
#   ADAKV_GPU_BUILD_DIR      build folder (default build-gpu-prefill; kept between runs on a warm machine)
#   ADAKV_CUDA_ARCHITECTURES default 90a-real: the H100's own (the full build does 80 and 90a)
#   ADAKV_BENCH_ARGS         extra arguments for both benchmarks, e.g. "--quick" or "--reps 10"
#   ADAKV_SKIP_BENCH=1       build and test only
# Exit status: 0 when the test passed and both benchmarks ran without a mismatch.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
gpu_build_setup build-gpu-prefill
gpu_machine name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,driver_version
gpu_configure "$logs/configure.log"
# adakv_gpu_prefill_tests exists once gpu_only.cmake lists the prefill test; until then the test
# is compiled here against the kernel library (its own main(), no GoogleTest needed).
targets=(adakv_cuda_kernels bench_prefill_attention)
have_test_target=0
if cmake --build "$build" --target help 2>/dev/null | grep -q "adakv_gpu_prefill_tests"; then
  targets+=(adakv_gpu_prefill_tests)
  have_test_target=1
fi
: >"$logs/build.log"
gpu_build "$logs/build.log" "${targets[@]}"
test_bin="$build/adakv_gpu_prefill_tests"
if [ "$have_test_target" = 0 ]; then
  cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
  lib=$(find "$build" -name libadakv_cuda_kernels.a | head -1)
  cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
  if ! "${cxx:-c++}" -std=c++20 -O2 -DADAKV_HAVE_CUDA=1 -DADAKV_PLAIN_TEST_MAIN=1 -Isrc -I"$cuda_root/include" \
      tests/gpu/test_prefill_attention.cc "$lib" -L"$cuda_root/lib64" -lcudart_static -ldl -lrt -lpthread \
      -o "$test_bin" >>"$logs/build.log" 2>&1; then
    tail -30 "$logs/build.log"
    echo "FAIL: build (test)"
    exit 1
  fi
fi
# Registers, spills and shared memory of the prefill kernels as built here.
awk '
  /Compiling entry function .*prefill_attention_kernel/ {
    name = $0; sub(/.*prefill_attention_kernelILi/, "d", name); sub(/ELi/, " bn ", name); sub(/EE.*/, "", name)
    arch = $0; sub(/.* for /, "", arch); want = 1; next
  }
  want && /bytes stack frame/ { spill = $0; gsub(/^ +/, "", spill); next }
  want && /Used [0-9]+ registers/ {
    regs = $0; sub(/.*Used /, "", regs)
    printf "  prefill %-10s %s: %s; %s\n", name, arch, regs, spill; want = 0
  }' "$logs/build.log" | sort -u
echo "build: $(( $(date +%s) - start )) s"

echo "== test"
"$test_bin" >"$logs/test.log" 2>&1
test_rc=$?
grep -E "^FAIL" "$logs/test.log" | head -20
grep -m1 -E "^SKIP" "$logs/test.log"
grep -E "^PASS .*(h32x8_q4096|_fused|_peaky|Arguments)" "$logs/test.log" | head -10
test_line="test: exit status $test_rc ($(tail -1 "$logs/test.log"))"
echo "$test_line"

bench_rc=0
sdpa_rc=0
if [ "${ADAKV_SKIP_BENCH:-0}" != 1 ]; then
  echo "== adakv benchmark"
  # shellcheck disable=SC2086
  OUT="$logs" "$build/bench/bench_prefill_attention" ${ADAKV_BENCH_ARGS:-} >"$logs/bench.log" 2>&1
  bench_rc=$?
  grep -E "^device|ceiling|MISMATCH|^run|CUDA call failed" "$logs/bench.log"
  echo "adakv bench exit status: $bench_rc ($(( $(date +%s) - start )) s)"
  echo "== SDPA (flash) benchmark"
  # shellcheck disable=SC2086
  OUT="$logs" python3 tools/bench/sdpa_prefill.py ${ADAKV_BENCH_ARGS:-} >"$logs/sdpa.log" 2>&1
  sdpa_rc=$?
  grep -E "^device|GEMM|refused|not finite|Error" "$logs/sdpa.log"
  echo "SDPA exit status: $sdpa_rc (total $(( $(date +%s) - start )) s)"
  echo "$test_line"
  sed -n '/^== prefill attention/,/^BEST/p' "$logs/bench.log" | grep -v "^BEST"
  echo
  echo "== adakv vs PyTorch SDPA flash (same run, same card; causal, batch 1; FLOPs = 4 d H L(L+1)/2)"
  python3 - "$logs/bench.log" "$logs/sdpa.log" <<'EOF'
import re, sys
def parse(path, tag):
    rows = {}
    for line in open(path, errors="replace"):
        if line.startswith(tag + " "):
            kv = dict(x.split("=", 1) for x in line.split()[1:])
            rows[(int(kv["d"]), int(kv["hq"]), int(kv["hkv"]), int(kv["L"]))] = kv
    return rows
ours, sdpa = parse(sys.argv[1], "BEST"), parse(sys.argv[2], "SDPA")
print("| shape (d, Hq/Hkv, L) | adakv TFLOP/s | adakv ms | SDPA TFLOP/s | SDPA ms | ratio |")
print("|---|---|---|---|---|---|")
for key in sorted(set(ours) | set(sdpa), key=lambda k: (-k[0], k[3])):
    d, hq, hkv, L = key
    a, s = ours.get(key), sdpa.get(key)
    at = f"{float(a['tflops']):.1f} (bn {a['bn']})" if a else "-"
    st = f"{float(s['tflops']):.1f}" + (" (expanded kv)" if s and s["mode"] != "gqa" else "") if s else "-"
    ratio = f"{float(a['tflops']) / float(s['tflops']):.2f}x" if a and s else "-"
    print(f"| {d}, {hq}/{hkv}, {L} | {at} | {a['ms'] if a else '-'} | {st} | {s['ms'] if s else '-'} | {ratio} |")
EOF
fi
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$sdpa_rc" -eq 0 ]
