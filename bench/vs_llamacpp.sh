#!/usr/bin/env bash
# backprompt and llama.cpp side by side: the same generated models, the same machine, the same
# minutes. For each model and weight type, `backprompt bench` and bench_llamacpp (the same
# measurements through libllama) run alternately, twice each, so that a slow minute on a shared
# machine hits both; the table gives each one's mean and the ratio.
#
#   bench/vs_llamacpp.sh                    every model (tinyllama-1.1b f32 is a 4.4 GB file)
#   BENCH_SKIP_BIG=1 bench/vs_llamacpp.sh   without tinyllama-1.1b f32
#
# llama.cpp comes prebuilt from the npm registry (@node-llama-cpp/linux-x64, llama.cpp's CPU
# backends for x86-64 with the best one picked at run time; needs `npm`, Debian package npm),
# installed once into bench/out/llamacpp; or set LLAMACPP_LIB to a directory holding
# libllama*.so and libggml*.so of your own build.
#
# Environment:
#   BENCH_REPS      timed runs per measurement (default 2), after a warm-up run; two rounds each
#   BENCH_THREADS   threads for both (default: all cores)
#   BENCH_ONLY      space-separated model names (default: llama-110m tinyllama-1.1b gpt2-124m)
#   BENCH_SKIP_BIG  1: skip tinyllama-1.1b f32
#   LLAMACPP_LIB    libllama directory to use instead of the npm package
#
# Columns: pp512 (one 512-token prefill) and tg128 (128 tokens decoded one at a time after a
# 512-token prompt) in tokens/s, mean of both rounds; "ratio" is backprompt over llama.cpp.
# pp512 bf16*: backprompt with BACKPROMPT_MATMUL=bf16 (not exact), against the same llama.cpp
# prefill. tg128 int8* (q8_0 models): backprompt with BACKPROMPT_DECODE=int8 (decode's q8_0
# products on activations quantized to int8, as llama.cpp does; not exact), against the same
# llama.cpp decode. llama.cpp runs with its defaults: f16 K/V cache (ours: f32), flash attention "auto",
# q8_0 activations for q8_0 weights, weights repacked at load where it has a layout for them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

reps=${BENCH_REPS:-2}
only=${BENCH_ONLY:-llama-110m tinyllama-1.1b gpt2-124m}
threads=${BENCH_THREADS:-$(nproc)}
. bench/common.sh
bench_build vs
lib=${LLAMACPP_LIB:-}
if [ -z "$lib" ]; then
  pkg=@node-llama-cpp/linux-x64@3.22.1
  lib=$out/llamacpp/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
  if [ ! -f "$lib/libggml-base.so" ]; then
    command -v npm >/dev/null || { echo "bench/vs_llamacpp.sh: needs npm (apt-get install npm) to fetch llama.cpp, or LLAMACPP_LIB" >&2; exit 2; }
    echo "== llama.cpp: npm install $pkg (into $out/llamacpp)"
    npm install --prefix "$out/llamacpp" --no-audit --no-fund --ignore-scripts "$pkg" >"$out/vs-npm.log" 2>&1 ||
      { tail -20 "$out/vs-npm.log"; echo "bench/vs_llamacpp.sh: npm install failed (log: $out/vs-npm.log)" >&2; exit 1; }
  fi
fi
[ -d "$lib" ] || { echo "bench/vs_llamacpp.sh: no libllama directory $lib" >&2; exit 2; }

results=$out/vs-results.txt
: >"$results"
for preset in $only; do
  dtypes=$(model_types "$preset") || exit 2
  for dt in $dtypes; do
    f=$(model_file "$preset" "$dt")
    for round in 1 2; do
      echo "-- $preset $dt, round $round"
      a=$out/vs-$preset-$dt-bp-$round.txt b=$out/vs-$preset-$dt-llamacpp-$round.txt
      "$bp" bench -m "$f" -p 512 -n 128 -r "$reps" -t "$threads" >"$a"
      grep -E "^(pp|tg)" "$a" | sed 's/^/   backprompt /'
      build/bench_llamacpp "$lib" "$f" -p 512 -n 128 -r "$reps" -t "$threads" >"$b" 2>"$b.err" ||
        { cat "$b.err" >&2; echo "bench/vs_llamacpp.sh: llama.cpp failed on $f" >&2; exit 1; }
      grep -E "^(pp|tg)" "$b" | sed 's/^/   llama.cpp  /'
      c=-
      case $dt in
        f16 | bf16 | q8_0)
          c=$out/vs-$preset-$dt-bpbf16-$round.txt
          BACKPROMPT_MATMUL=bf16 "$bp" bench -m "$f" -p 512 -n 0 -r "$reps" -t "$threads" >"$c"
          grep -E "^pp" "$c" | sed 's/^/   backprompt bf16* /'
          ;;
      esac
      d=-
      if [ "$dt" = q8_0 ]; then
        d=$out/vs-$preset-$dt-bpint8-$round.txt
        BACKPROMPT_DECODE=int8 "$bp" bench -m "$f" -p 512 -n 128 -r "$reps" -t "$threads" >"$d"
        grep -E "^tg" "$d" | sed 's/^/   backprompt int8* /'
      fi
      echo "$preset $dt $round $a $b $c $d" >>"$results"
    done
  done
done

echo
echo "================ backprompt vs llama.cpp ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $threads threads," \
  "load average $(cut -d' ' -f1-3 /proc/loadavg))"
grep -m1 "^llama.cpp:" "$out/vs-$(head -1 "$results" | cut -d' ' -f1)-$(head -1 "$results" | cut -d' ' -f2)-llamacpp-1.txt" || true
/usr/bin/python3 - "$results" <<'PY'
import re, sys
from collections import defaultdict

def rate(path, prefix):
    if path == "-":
        return None
    for line in open(path):
        m = re.match(prefix + r"\d+: ([\d.]+)", line)
        if m:
            return float(m.group(1))
    return None

runs = defaultdict(lambda: defaultdict(list))  # (preset, dtype) -> measure -> [value per round]
order = []
for line in open(sys.argv[1]):
    preset, dt, _, a, b, c, d = line.split()
    key = (preset, dt)
    if key not in runs:
        order.append(key)
    for name, path, prefix in (("bp_pp", a, "pp"), ("bp_tg", a, "tg"), ("lc_pp", b, "pp"), ("lc_tg", b, "tg"), ("bf_pp", c, "pp"), ("i8_tg", d, "tg")):
        v = rate(path, prefix)
        if v is not None:
            runs[key][name].append(v)

def mean(xs):
    return sum(xs) / len(xs) if xs else None

def cell(x, digits=1):
    return f"{x:.{digits}f}" if x is not None else "-"

def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"

head = ["model", "type", "pp512 backprompt", "llama.cpp", "ratio", "pp512 bf16*", "ratio",
        "tg128 backprompt", "llama.cpp", "ratio", "tg128 int8*", "ratio"]
rows = []
for key in order:
    r = {k: mean(v) for k, v in runs[key].items()}
    rows.append([key[0], key[1], cell(r.get("bp_pp")), cell(r.get("lc_pp")), ratio(r.get("bp_pp"), r.get("lc_pp")),
                 cell(r.get("bf_pp")), ratio(r.get("bf_pp"), r.get("lc_pp")),
                 cell(r.get("bp_tg"), 2), cell(r.get("lc_tg"), 2), ratio(r.get("bp_tg"), r.get("lc_tg")),
                 cell(r.get("i8_tg"), 2), ratio(r.get("i8_tg"), r.get("lc_tg"))])
width = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
print("  ".join(h.ljust(w) for h, w in zip(head, width)))
for x in rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(x, width)))
print("tokens/s, mean of two rounds; ratio = backprompt / llama.cpp; bf16* = BACKPROMPT_MATMUL=bf16 (not exact); "
      "int8* = BACKPROMPT_DECODE=int8 (not exact)")
PY
echo "(logs in $out/vs-*.txt)"
