#!/usr/bin/env bash
# Builds everything and runs all tests: unit tests (ctest), then each fuzz target for a bounded
# time (FUZZ_SECONDS, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
(cd build && ctest --output-on-failure -j "$(nproc)" --timeout 900)
if [ -f tests/fuzz/run_fuzz.sh ]; then
  bash tests/fuzz/run_fuzz.sh build-fuzz
fi
echo "all tests passed"
