#!/usr/bin/env bash
# adakv bench serve on the CPU with the shipped model: full cache against compressed caches
# under a KV limit where the full cache fits about 3.4 requests (docs/benchmarks.md, "Serving").
# Usage: scripts/bench_serve_cpu.sh [BUILD_DIR] (default build); prints each run's report.
set -euo pipefail
BIN="${1:-build}/adakv"
MODEL=models/adakv-tiny-v1
COMMON=(bench serve --model "$MODEL" -n 16 --prompt-tokens 512 --output-tokens 128 --prompts haystack)
LIMIT=(--kv-memory 17M)  # 2176 pages of 16 tokens; one full request (640 tokens) = 640 pages
run() { echo "== $*"; "$BIN" "${COMMON[@]}" "$@"; }
run --kv-policy full                          # no limit: the CPU's ceiling
run --kv-policy full "${LIMIT[@]}"
run --kv-policy ada-snapkv --kv-budget 128 "${LIMIT[@]}"
run --kv-policy snapkv --kv-budget 128 "${LIMIT[@]}"
run --kv-policy kvcompress --kv-budget 128 "${LIMIT[@]}"
