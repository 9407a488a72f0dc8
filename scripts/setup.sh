#!/usr/bin/env bash
# Installs every Debian 12 package backprompt needs to build, test and benchmark.
# Run as root (CI does) or as a user with sudo.
set -euo pipefail
packages=(
  cmake ninja-build g++ pkg-config
  libdnnl-dev ocl-icd-opencl-dev libhwy-dev libpcre2-dev libxxhash-dev libzstd-dev
  nlohmann-json3-dev libcli11-dev libhiredis-dev redis-server
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-numpy
  clang libclang-rt-14-dev
)
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
