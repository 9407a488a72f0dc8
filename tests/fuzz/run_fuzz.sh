#!/usr/bin/env bash
# Builds every libFuzzer target tests/fuzz/fuzz_*.cpp with clang++-14 (ASan + UBSan) and runs
# each for a bounded time. Exits non-zero if any target fails to build or finds a crash, a
# sanitizer report, a leak, a timeout or an out-of-memory input.
#
# Usage: tests/fuzz/run_fuzz.sh [OUT_DIR]          (default: build-fuzz, relative to the cwd)
# Environment:
#   FUZZ_SECONDS          time per target (default 60)
#   FUZZ_TARGETS          space-separated target names to run (default: all), e.g. "fuzz_gguf"
#   FUZZ_SEED_MAX_BYTES   largest test-data file used as a seed (default 2000000)
#   BACKPROMPT_TEST_DATA  test data directory (default: <repo>/../shared/models)
#   CXX                   compiler (default clang++-14)
#
# A target is one file tests/fuzz/fuzz_NAME.cpp defining LLVMFuzzerTestOneInput, with lines:
#   // FUZZ_SOURCES: src/a.cpp src/b.cpp     library sources it needs (repo-relative; required)
#   // FUZZ_LIBS: -lzstd                      extra link flags (optional)
#   // FUZZ_SEED_FILES: *.gguf               optional: test-data files (by name glob) used as seeds
# and optionally a `#ifdef FUZZ_MAKE_SEEDS` main(argc, argv) that writes seed inputs into argv[1];
# the script builds and runs it (without the fuzzer runtime) before fuzzing. Seeds checked in
# under tests/fuzz/corpus/fuzz_NAME/ are used too. The working corpus, crash artifacts and logs
# stay in OUT_DIR/fuzz_NAME.*; a later run continues from the corpus left there.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-build-fuzz}
mkdir -p "$out"
out=$(cd "$out" && pwd)
seconds=${FUZZ_SECONDS:-60}
seed_max=${FUZZ_SEED_MAX_BYTES:-2000000}
data_dir=${BACKPROMPT_TEST_DATA:-$repo/../shared/models}
cxx=${CXX:-clang++-14}

common_flags=(-std=c++20 -g -O1 -fno-omit-frame-pointer -I"$repo/include" -I"$repo/src")
sanitize_flags=(-fsanitize=address,undefined -fno-sanitize-recover=all)

shopt -s nullglob
targets=("$repo"/tests/fuzz/fuzz_*.cpp)
if [ ${#targets[@]} -eq 0 ]; then
  echo "run_fuzz: no targets in $repo/tests/fuzz" >&2
  exit 1
fi

failed=()
for src in "${targets[@]}"; do
  name=$(basename "$src" .cpp)
  if [ -n "${FUZZ_TARGETS:-}" ] && [[ " $FUZZ_TARGETS " != *" $name "* ]]; then
    continue
  fi
  # `read -a` splits words without expanding globs (FUZZ_SEED_FILES holds globs meant for find).
  read -r -a source_list <<<"$(sed -n 's#^// FUZZ_SOURCES:##p' "$src")" || true
  read -r -a libs <<<"$(sed -n 's#^// FUZZ_LIBS:##p' "$src")" || true
  read -r -a seed_globs <<<"$(sed -n 's#^// FUZZ_SEED_FILES:##p' "$src")" || true
  sources=()
  for s in "${source_list[@]}"; do sources+=("$repo/$s"); done
  if [ ${#sources[@]} -eq 0 ]; then
    echo "run_fuzz: $name: no '// FUZZ_SOURCES:' line" >&2
    failed+=("$name(no sources)")
    continue
  fi

  echo "== $name: building"
  if ! "$cxx" "${common_flags[@]}" "${sanitize_flags[@]}" -fsanitize=fuzzer "$src" "${sources[@]}" "${libs[@]}" -o "$out/$name"; then
    failed+=("$name(build)")
    continue
  fi

  corpus="$out/$name.corpus"
  seeds="$out/$name.seeds"
  rm -rf "$seeds"
  mkdir -p "$corpus" "$seeds"
  if grep -q '^#ifdef FUZZ_MAKE_SEEDS' "$src"; then
    "$cxx" "${common_flags[@]}" "${sanitize_flags[@]}" -DFUZZ_MAKE_SEEDS "$src" "${sources[@]}" "${libs[@]}" -o "$out/$name.seed-maker"
    "$out/$name.seed-maker" "$seeds"
  fi
  if [ -d "$repo/tests/fuzz/corpus/$name" ]; then
    cp "$repo/tests/fuzz/corpus/$name"/* "$seeds"/ 2>/dev/null || true
  fi
  for glob in "${seed_globs[@]}"; do
    if [ -d "$data_dir" ]; then
      while IFS= read -r -d '' f; do
        cp "$f" "$seeds/data_$(basename "$f")"
      done < <(find -L "$data_dir" -type f -name "$glob" -size -"$seed_max"c -print0)
    fi
  done
  echo "== $name: $(ls "$seeds" | wc -l) seeds, $(ls "$corpus" | wc -l) inputs in corpus, ${seconds}s"

  # New interesting inputs go to the first directory (the corpus); seeds are read only.
  rc=0
  "$out/$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/$name.crash-" "$corpus" "$seeds" >"$out/$name.log" 2>&1 || rc=$?
  tail -n 15 "$out/$name.log"
  if [ $rc -ne 0 ]; then
    echo "run_fuzz: $name FAILED (exit $rc); artifacts: $(ls "$out/$name".crash-* 2>/dev/null | tr '\n' ' ')" >&2
    echo "run_fuzz: reproduce with: $out/$name <artifact>" >&2
    failed+=("$name")
  fi
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "run_fuzz: failures: ${failed[*]}" >&2
  exit 1
fi
echo "run_fuzz: all targets passed"
