# shellcheck shell=bash
# The set-up that the scripts/gpu_*_check.sh scripts share; sourced by them, never run.
# Two kinds of check script use it:
#   - those that build on the GPU machine from the repository alone (GPU-only CMake build: none
#     of the host library's third-party packages, which that machine lacks): gpu_build_setup,
#     gpu_configure, gpu_build;
#   - those that run binaries built here and carried in .carry/*.tar.xz: gpu_carried.
# Both print the machine with gpu_machine. Every function exits the script with "FAIL: ..." on
# an error, as the scripts' callers expect.

# shellcheck disable=SC2034  # build, archs, logs and start are the calling script's
# Build folder, architectures, log folder and start time for a script that builds:
# build=${ADAKV_GPU_BUILD_DIR:-$1}, archs=${ADAKV_CUDA_ARCHITECTURES:-90a-real},
# logs=${OUT:-$build/logs}, start (seconds); nvcc on PATH.
gpu_build_setup() {
  export PATH=/usr/local/cuda/bin:$PATH
  build=${ADAKV_GPU_BUILD_DIR:-$1}
  archs=${ADAKV_CUDA_ARCHITECTURES:-90a-real}
  logs=${OUT:-$build/logs}
  mkdir -p "$logs"
  start=$(date +%s)
}

# "== machine": the GPU (nvidia-smi fields, default name, memory, clocks, driver) and, where nvcc
# is on PATH, its version.
gpu_machine() {
  echo "== machine"
  nvidia-smi --query-gpu="${1:-name,memory.total,clocks.max.sm,clocks.max.memory,driver_version}" \
    --format=csv,noheader || true
  if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -1; fi
}

# Configures $build as a GPU-only release build for $archs (ptxas statistics on), the log in $1.
gpu_configure() {
  local log=$1 generator=()
  echo "== build ($build, $archs)"
  command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
  if ! cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DADAKV_GPU_ONLY=ON \
      -DADAKV_CUDA_ARCHITECTURES="$archs" -DADAKV_CUDA_PTXAS_VERBOSE=ON >"$log" 2>&1; then
    tail -30 "$log"
    echo "FAIL: configure"
    exit 1
  fi
}

# Builds the targets $2... of $build with every core, appending to the log $1.
gpu_build() {
  local log=$1
  shift
  if ! cmake --build "$build" -j "$(nproc)" --target "$@" >>"$log" 2>&1; then
    grep -E "error|FAILED" "$log" | head -30
    echo "FAIL: build"
    exit 1
  fi
}

# For a script that runs carried binaries: logs=${OUT:-/tmp/adakv-logs}, the CUDA runtime on the
# library path, /work/main pointing here (the tests find their fixtures through the absolute path
# they were built with), the tarball $1 unpacked into $2, start (seconds).
gpu_carried() {
  logs=${OUT:-/tmp/adakv-logs}
  mkdir -p "$logs"
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
  [ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
  mkdir -p "$2" && tar -C "$2" -xJf "$1" || { echo "FAIL: unpack $1"; exit 1; }
  # shellcheck disable=SC2034  # the calling script's
  start=$(date +%s)
}
