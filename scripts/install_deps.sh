#!/usr/bin/env bash
# Installs the Debian 12 packages adakv builds and tests with (idempotent; needs root or sudo).
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config git xz-utils
      nlohmann-json3-dev libcli11-dev libpcre2-dev libopenblas-dev gfortran
      libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev
      python3 python3-pip python3-venv curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The server tests (tests/server) talk to `adakv serve` with the official openai client: a venv
# in build-venv/ (ignored by git like every build*/ folder) with it and pytest from PyPI.
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/build-venv"
if ! "$venv/bin/python" -c "import openai, pytest" 2>/dev/null; then
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "openai>=1.0" pytest
fi
