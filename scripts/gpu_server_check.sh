#!/usr/bin/env bash
# The server test suite (tests/server: the OpenAI API through the official client, streaming,
# disconnects, signals, limits, 64 concurrent clients) against `adakv serve --device cuda` on
# the GPU machine. That machine has no network: the suite's Python packages come as wheels
# downloaded here and carried, the binary as .carry/runner.tar.xz (see gpu_runner_check.sh).
# Prepare here:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .carry/wheels/py3.12 openai pytest
# and carry .carry/runner.tar.xz and .carry/wheels. Logs in $OUT; exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
bin=/tmp/runner
gpu_carried .carry/runner.tar.xz $bin
py=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
wheels=.carry/wheels/py$py
[ -d "$wheels" ] || { echo "FAIL: no wheels for python $py in .carry/wheels"; exit 1; }
python3 -m venv --system-site-packages /tmp/server-venv >"$logs/venv.log" 2>&1 &&
  /tmp/server-venv/bin/pip install -q --no-index --find-links "$wheels" openai pytest >>"$logs/venv.log" 2>&1 ||
  { tail -20 "$logs/venv.log"; echo "FAIL: venv"; exit 1; }
gpu_machine name,driver_version
start=$(date +%s)
ADAKV_BINARY=$bin/adakv ADAKV_SERVER_ARGS="--device cuda" timeout ${ADAKV_TEST_TIMEOUT:-400} \
  /tmp/server-venv/bin/python -m pytest tests/server -q -p no:cacheprovider >"$logs/server_tests.log" 2>&1
rc=$?
tail -15 "$logs/server_tests.log"
echo "server tests on cuda: exit $rc ($(( $(date +%s) - start )) s)"
exit $rc
