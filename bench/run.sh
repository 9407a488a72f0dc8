#!/usr/bin/env bash
# Builds backprompt (Release, ./build), makes the benchmark models, runs `backprompt bench` on each
# and the cache workloads (bench_cache), then prints a summary. Everything lands in bench/out/.
#
#   bench/run.sh                 full run (slow on a few cores)
#   BENCH_QUICK=1 bench/run.sh   smoke run: small sizes, one rep
#
# Environment:
#   BENCH_REPS     timed runs per `backprompt bench` test (default 3; 1 with BENCH_QUICK)
#   BENCH_QUICK    1: pp64/tg16 and the small cache workloads
#   BENCH_THREADS  threads (default: all cores)
#   BENCH_SAMPLE   texts per cache workload computed from scratch and extrapolated (default 8)
#   BENCH_CACHE_REPS  rounds of each cache measurement, keeping the fastest (default 1)
#   BENCH_DTYPES   weight types of llama-110m to bench (default "f32 f16 q8_0")
# Models are cached in bench/out/models/ (delete them to remake). The vocabulary is the Llama
# SentencePiece one from ../shared/models/ggml-vocab/ when present, else the built-in byte vocab.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

quick=${BENCH_QUICK:-0}
reps=${BENCH_REPS:-$([ "$quick" = 1 ] && echo 1 || echo 3)}
sample=${BENCH_SAMPLE:-8}
cache_reps=${BENCH_CACHE_REPS:-1}
dtypes=${BENCH_DTYPES:-f32 f16 q8_0}
threads_arg=()
[ -n "${BENCH_THREADS:-}" ] && threads_arg=(-t "$BENCH_THREADS")
if [ "$quick" = 1 ]; then
  pp=64 tg=16 cache_args=(--quick)
  [ -z "${BENCH_SAMPLE:-}" ] && sample=2
else
  pp=512 tg=128 cache_args=()
fi

. bench/common.sh
bench_build bench
bench_cache=build/bench_cache

echo "== models"
declare -A model_of
for dt in $dtypes f32; do model_of[$dt]=$(model_file llama-110m "$dt"); echo "   ${model_of[$dt]}"; done
model_path() { echo "${model_of[$1]}"; }

echo "== backprompt bench (pp$pp, tg$tg, $reps reps after a warm-up)"
summary=()
for dt in $dtypes; do
  m=$(model_path "$dt")
  log=$out/bench-llama-110m-$dt.txt
  echo "-- llama-110m $dt"
  "$bp" bench -m "$m" -p "$pp" -n "$tg" -r "$reps" "${threads_arg[@]}" | tee "$log"
  pp_line=$(grep "^pp" "$log" | sed 's/^[^:]*: //')
  tg_line=$(grep "^tg" "$log" | sed 's/^[^:]*: //')
  rss=$(grep "^peak RSS" "$log" | sed 's/^[^:]*: //')
  threads=$(grep "^threads" "$log" | sed 's/^[^:]*: //')
  summary+=("$(printf '%-18s %-26s %-26s %-8s %s' "llama-110m $dt" "$pp_line" "$tg_line" "$threads" "$rss")")
done

echo "== cache workloads (bench_cache, llama-110m f32)"
cache_log=$out/bench-cache.txt
"$bench_cache" "$(model_path f32)" --sample "$sample" --reps "$cache_reps" "${cache_args[@]}" "${threads_arg[@]}" | tee "$cache_log"

echo
echo "================ summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%-18s %-26s %-26s %-8s %s\n' "model" "pp$pp" "tg$tg" "threads" "peak RSS"
for line in "${summary[@]}"; do echo "$line"; done
echo
sed -n '/^ *texts/,$p' "$cache_log"
echo "(logs in $out/; figures from a shared machine are noisy: compare runs made under the same load)"
