#!/usr/bin/env bash
# Installs the Debian 12 packages adakv builds and tests with (idempotent; needs root or sudo).
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config git xz-utils
      nlohmann-json3-dev libcli11-dev libcpp-httplib-dev libpcre2-dev libopenblas-dev gfortran
      libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev
      python3 python3-pip)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
