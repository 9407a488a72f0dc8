#!/usr/bin/env bash
# Where the weights live, measured: `backprompt bench` with --weights mmap (the file's mapping)
# and --weights memory (a copy on transparent huge pages), alternating, several rounds, on the
# same model files. Prints each round's decode and prefill rates and the ratio of the means.
#
#   bench/weights.sh                       tinyllama-1.1b (every type), llama-110m f16, gpt2-124m f32
#   BENCH_ONLY="tinyllama-1.1b" bench/weights.sh
#
# Environment: BENCH_ROUNDS (default 3), BENCH_REPS (timed runs per measurement, default 2),
# BENCH_THREADS (default: all cores), BENCH_N_GEN (decoded tokens, default 64, after a 512-token
# prompt), BENCH_ONLY, BENCH_SKIP_BIG=1 (without tinyllama-1.1b f32).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rounds=${BENCH_ROUNDS:-3}
reps=${BENCH_REPS:-2}
threads=${BENCH_THREADS:-$(nproc)}
n_gen=${BENCH_N_GEN:-64}
only=${BENCH_ONLY:-tinyllama-1.1b llama-110m gpt2-124m}
. bench/common.sh
bench_build weights

results=$out/weights-results.txt
: >"$results"
for preset in $only; do
  case $preset in
    llama-110m) dtypes=f16 ;;
    gpt2-124m) dtypes=f32 ;;
    *) dtypes=$(model_types "$preset") || exit 2 ;;
  esac
  for dt in $dtypes; do
    f=$(model_file "$preset" "$dt")
    for round in $(seq "$rounds"); do
      for w in mmap memory; do
        log=$out/weights-$preset-$dt-$w-$round.txt
        "$bp" bench -m "$f" -p 512 -n "$n_gen" -r "$reps" -t "$threads" --weights "$w" >"$log"
        pp=$(awk '/^pp/ { print $2 }' "$log") tg=$(awk '/^tg/ { print $2 }' "$log")
        load=$(awk '/^model load/ { print $3 }' "$log")
        echo "-- $preset $dt round $round $w: pp512 $pp tg$n_gen $tg tok/s, load $load s"
        echo "$preset $dt $round $w $pp $tg $load" >>"$results"
      done
    done
  done
done

echo
echo "== $(date -u +%Y-%m-%dT%H:%MZ), $threads threads, tg$n_gen after 512 tokens (tok/s per round) and pp512 (mean)"
awk -v n="$n_gen" '
  { key = $1 " " $2; if (!(key in seen)) { seen[key] = 1; order[++k] = key }
    tg[key, $4] = tg[key, $4] sprintf(" %.1f", $6); sum[key, $4] += $6; cnt[key, $4]++
    pp[key, $4] += $5; ld[key, $4] += $7 }
  END {
    printf "%-16s %-5s %-24s %-24s %-7s %-15s %-15s %s\n", "model", "type", "tg mmap", "tg memory", "ratio", "pp512 mmap/mem", "load mmap/mem", ""
    for (i = 1; i <= k; ++i) {
      key = order[i]; split(key, p, " ")
      a = sum[key, "mmap"] / cnt[key, "mmap"]; b = sum[key, "memory"] / cnt[key, "memory"]
      printf "%-16s %-5s %-24s %-24s %-7s %-15s %-15s\n", p[1], p[2], tg[key, "mmap"], tg[key, "memory"],
        sprintf("%.2fx", b / a), sprintf("%.0f/%.0f", pp[key, "mmap"] / cnt[key, "mmap"], pp[key, "memory"] / cnt[key, "memory"]),
        sprintf("%.1f/%.1f s", ld[key, "mmap"] / cnt[key, "mmap"], ld[key, "memory"] / cnt[key, "memory"])
    }
  }' "$results"
