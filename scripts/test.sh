#!/usr/bin/env bash
# The test command: installs what is missing, builds everything (the CUDA backend too when nvcc
# exists), runs every ctest label (gpu tests skip without a device) and the fuzzers briefly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
[ -d /usr/local/cuda/bin ] && export PATH=/usr/local/cuda/bin:$PATH
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
ninja -C build
ctest --test-dir build --output-on-failure -j2
tools/run_fuzzers.sh "${ADAKV_FUZZ_SECONDS:-20}"
