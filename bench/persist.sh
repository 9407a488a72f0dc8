#!/usr/bin/env bash
# Persistence benchmarks (one command): snapshot save/restore throughput and size per K/V storage
# type for a 1000-token llama-110m prompt, then workload W2 run twice in two processes against a
# dir: store and against Redis (second-run wall time versus first).
# Env: BENCH_THREADS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
out=bench/out
mkdir -p "$out/models"
vocab=../shared/models/ggml-vocab/ggml-vocab-llama-spm.gguf
vocab_args=()
tag=byte
if [ -f "$vocab" ]; then vocab_args=(--vocab "$vocab"); tag=spm; fi
model="$out/models/llama-110m-f32-$tag.gguf"  # the same file bench/run.sh makes
[ -f "$model" ] || ./build/backprompt make-model --arch llama --preset llama-110m --dtype f32 "${vocab_args[@]}" -o "$model"
threads=(-t "${BENCH_THREADS:-$(nproc)}")

echo "== snapshots"
./build/bench_snapshot "$model" --tokens 1000 "${threads[@]}" | tee "$out/persist-snapshot.txt"

echo "== W2 twice against a dir: store"
store_dir=$(mktemp -d)
for run in first second; do
  printf '%s: ' "$run"
  ./build/bench_cache "$model" --only W2 --store "dir:$store_dir" "${threads[@]}" | grep 'with store'
done | tee "$out/persist-dir.txt"
rm -rf "$store_dir"

echo "== W2 twice against Redis"
if command -v redis-server >/dev/null; then
  port=$(( 20000 + RANDOM % 20000 ))
  redis_dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$redis_dir" >/dev/null &
  redis_pid=$!
  trap 'kill $redis_pid 2>/dev/null; rm -rf "$redis_dir"' EXIT
  sleep 1
  for run in first second; do
    printf '%s: ' "$run"
    ./build/bench_cache "$model" --only W2 --store "redis://127.0.0.1:$port/0" "${threads[@]}" | grep 'with store'
  done | tee "$out/persist-redis.txt"
else
  echo "redis-server not installed: skipped"
fi
