#!/usr/bin/env bash
# The speed table of issue 5, in one command: builds backprompt (Release, ./build), makes the
# models (once, cached in bench/out/models/), measures the machine's limits (bench_limits), runs
# `backprompt bench` on every model and prints one table: prefill (pp512) and decode (tg128)
# tokens/s, each as a fraction of its limit, peak memory, and llama.cpp's figures from the issue.
#
#   bench/speed.sh                    everything (tinyllama-1.1b f32 is a 4.4 GB file: slow to make once)
#   BENCH_SKIP_BIG=1 bench/speed.sh   without tinyllama-1.1b f32
#
# Environment:
#   BENCH_REPS      timed runs per `backprompt bench` test (default 3), after a warm-up run
#   BENCH_THREADS   threads (default: all cores)
#   BENCH_SKIP_BIG  1: skip tinyllama-1.1b f32
#   BENCH_ONLY      space-separated model names to run (e.g. "llama-110m"), default all three
# On a machine shared with other work, OpenMP threads that spin while waiting are descheduled and
# every figure suffers: set OMP_WAIT_POLICY=passive there (the table's header says which was used).
#
# Columns:
#   pp512     prefill: one 512-token append, logits of the last token (mean ± sd over the reps)
#   tg128     decode: 128 tokens one at a time after a 512-token prompt
#   pp/peak   useful prefill FLOP/s (2 x weight-matrix elements + causal attention, per token)
#             over the peak GEMM throughput of the arithmetic used (f32 sgemm; bf16 GEMM for the
#             starred rows "f16*", "bf16*", "q8_0*", which run the same model with
#             BACKPROMPT_MATMUL=bf16: activations, weights and the attention's operands rounded
#             to bf16, not exact; "q8_0*" also with BACKPROMPT_DECODE=int8: decode's q8_0 products
#             on activations quantized to int8, not exact), measured next to that row
#             (`bench_limits --gemm` just before and just after it, the higher of the two, in
#             brackets), for the same reason as the bandwidth below
#   pp/peak max the same over the highest peak of that arithmetic measured anywhere in the run
#             (the stricter figure)
#   tg/bw     bytes a decode step must read (every weight matrix except the embedding table, plus
#             the f32 K/V of the 576 positions attended to on average) x tg128 / read bandwidth
#             measured next to that row (`bench_limits --bandwidth` just before and just after it,
#             the higher of the two, in brackets): a shared machine's bandwidth drifts by up to 2x
#             within minutes, so a limit taken minutes earlier says little about this row
#   tg/bw max the same over the highest bandwidth measured anywhere in the run (the stricter figure)
#   tg/file bw the same over the rate at which a plain read loop reads the model file's own mapped
#             pages (`bench_limits --bandwidth --file`, just before and after the row, the higher):
#             decode reads its weights from those pages, and on some hosts (this VM) page-cache
#             pages read markedly slower than fresh anonymous memory
#   llama.cpp the issue's figures for the same shapes (February 2025 build, 2 threads, AVX-512 EPYC);
#             starred rows against the same type's, bf16 against f16's (the issue has no bf16 figures)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

reps=${BENCH_REPS:-3}
only=${BENCH_ONLY:-llama-110m tinyllama-1.1b gpt2-124m}
threads_arg=()
[ -n "${BENCH_THREADS:-}" ] && threads_arg=(-t "$BENCH_THREADS")
. bench/common.sh
bench_build speed
runs=()  # "preset dtype label file env"
for preset in $only; do
  dtypes=$(model_types "$preset") || exit 2
  echo "== models: $preset ($dtypes)"
  for dt in $dtypes; do
    f=$(model_file "$preset" "$dt")
    runs+=("$preset $dt $dt $f -")
    case $dt in
      f16 | bf16) runs+=("$preset $dt $dt* $f BACKPROMPT_MATMUL=bf16") ;;
      q8_0) runs+=("$preset $dt $dt* $f BACKPROMPT_MATMUL=bf16 BACKPROMPT_DECODE=int8") ;;
    esac
  done
done

load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }' && [ -z "${OMP_WAIT_POLICY:-}" ]; then
  echo "   note: load average $load before the run: other work shares the cores; spinning OpenMP" \
    "threads stall behind it (consider OMP_WAIT_POLICY=passive)"
fi

echo "== machine limits (bench_limits)"
limits_log=$out/speed-limits.txt
build/bench_limits "${threads_arg[@]}" | tee "$limits_log"

echo "== backprompt bench (pp512, tg128, $reps reps after a warm-up)"
results=$out/speed-results.txt
: >"$results"
# "<anonymous memory GB/s> <the model file's mapped pages GB/s>"
bandwidth_probe() {
  build/bench_limits "${threads_arg[@]}" --bandwidth --file "$1" |
    awk '/^limit bandwidth/ { a = $3 } /^limit file_bandwidth/ { f = $3 } END { print a, f }'
}
# The peak GEMM throughput of one arithmetic (f32 or bf16), GFLOP/s.
gemm_probe() {
  build/bench_limits "${threads_arg[@]}" --gemm "$1" | awk '/^limit gemm_/ { print $3 }'
}
for r in "${runs[@]}"; do
  read -r preset dt label f envs <<<"$r"
  log=$out/speed-$preset-$label.txt
  gemm_type=f32
  case $label in *"*") gemm_type=bf16 ;; esac
  gemm_before=$(gemm_probe $gemm_type)
  read -r bw_before fbw_before <<<"$(bandwidth_probe "$f")"
  echo "-- $preset $label (read bandwidth just before: $bw_before GB/s, the model file's pages $fbw_before GB/s;" \
    "$gemm_type GEMM $gemm_before GFLOP/s)"
  if [ "$envs" = - ]; then
    "$bp" bench -m "$f" -p 512 -n 128 -r "$reps" "${threads_arg[@]}" | tee "$log"
  else
    read -r -a env_list <<<"$envs"
    env "${env_list[@]}" "$bp" bench -m "$f" -p 512 -n 128 -r "$reps" "${threads_arg[@]}" | tee "$log"
  fi
  read -r bw_after fbw_after <<<"$(bandwidth_probe "$f")"
  gemm_after=$(gemm_probe $gemm_type)
  echo "   read bandwidth just after: $bw_after GB/s, the model file's pages $fbw_after GB/s;" \
    "$gemm_type GEMM $gemm_after GFLOP/s"
  echo "$preset $label $f $log $bw_before $bw_after $fbw_before $fbw_after $gemm_type $gemm_before $gemm_after" >>"$results"
done

# The limits again: on a shared machine, other work during one of the two measurements would
# make every ratio look better than it is; the table takes the higher of each.
echo "== machine limits again (bench_limits)"
build/bench_limits "${threads_arg[@]}" | tee -a "$limits_log"

echo
echo "================ speed ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, threads ${BENCH_THREADS:-all}," \
  "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset}, load average $(cut -d' ' -f1-3 /proc/loadavg))"
grep -m1 -E "^cpu:" "$limits_log" || true
/usr/bin/python3 - "$limits_log" "$results" <<'EOF'
import re, struct, sys

limits = {}  # the higher of the two measurements of each
for line in open(sys.argv[1]):
    m = re.match(r"limit (\S+) ([\d.]+)", line)
    if m:
        limits[m.group(1)] = max(limits.get(m.group(1), 0.0), float(m.group(2)))

# llama.cpp (February 2025 build, 2 threads) on the issue's machine: (pp512, tg128).
LLAMA_CPP = {("llama-110m", "f32"): (809, 62), ("llama-110m", "f16"): (1037, 136), ("llama-110m", "q8_0"): (930, 205),
             ("tinyllama-1.1b", "f32"): (92, 13.5), ("tinyllama-1.1b", "f16"): (129, 21), ("tinyllama-1.1b", "q8_0"): (104, 35)}

def gguf_info(path):
    """Hyperparameters and tensor shapes/types from a GGUF file's header."""
    f = open(path, "rb")
    def u32(): return struct.unpack("<I", f.read(4))[0]
    def u64(): return struct.unpack("<Q", f.read(8))[0]
    def string(): return f.read(u64()).decode("utf-8", "replace")
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    def value(t):
        if t == 8: return string()
        if t == 9:
            et, n = u32(), u64()
            if et == 8:
                for _ in range(n): string()
            else:
                f.seek(sizes[et] * n, 1)
            return None
        raw = f.read(sizes[t])
        return struct.unpack({0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}[t], raw)[0]
    assert f.read(4) == b"GGUF"
    u32()
    n_tensors, n_kv = u64(), u64()
    kv = {}
    for _ in range(n_kv):
        k = string()
        kv[k] = value(u32())
    tensors = []
    for _ in range(n_tensors):
        name = string()
        ne = [u64() for _ in range(u32())]
        t = u32()
        u64()
        tensors.append((name, ne, t))
    return kv, tensors

BYTES = {0: 4.0, 1: 2.0, 30: 2.0, 8: 34 / 32}  # f32, f16, bf16, q8_0 per element

def fmt_rate(line):
    m = re.search(r":\s*([\d.]+)\s*±\s*([\d.]+)", line)
    return (float(m.group(1)), float(m.group(2))) if m else (None, None)

rows = []
bw_best = limits.get("bandwidth", 0.0)
peak_best = {"f32": limits.get("gemm_f32", 0.0), "bf16": limits.get("gemm_bf16", 0.0)}
for line in open(sys.argv[2]):
    bw_best = max([bw_best] + [float(x) for x in line.split()[4:6]])
    gemm_type = line.split()[8]
    peak_best[gemm_type] = max([peak_best[gemm_type]] + [float(x) for x in line.split()[9:11]])
for line in open(sys.argv[2]):
    preset, label, path, log, bw_before, bw_after, fbw_before, fbw_after, gemm_type, gemm_before, gemm_after = line.split()
    peak_near = max(float(gemm_before), float(gemm_after))
    bw_near = max(float(bw_before), float(bw_after))
    fbw_near = max(float(fbw_before), float(fbw_after))
    text = open(log).read()
    pp, pp_sd = fmt_rate(next((l for l in text.splitlines() if l.startswith("pp")), ""))
    tg, tg_sd = fmt_rate(next((l for l in text.splitlines() if l.startswith("tg")), ""))
    rss = re.search(r"peak RSS: ([\d.]+) MiB", text)
    kv, tensors = gguf_info(path)
    arch = kv["general.architecture"]
    n_layer = kv[arch + ".block_count"]
    n_embd = kv[arch + ".embedding_length"]
    n_head = kv[arch + ".attention.head_count"]
    n_kv_head = kv.get(arch + ".attention.head_count_kv", n_head)
    kv_dim = n_embd // n_head * n_kv_head
    names = {t[0] for t in tensors}
    mat_elems, read_bytes = 0, 0.0
    for name, ne, t in tensors:
        if len(ne) != 2 or name == "position_embd.weight":
            continue
        elems = ne[0] * ne[1]
        if name == "token_embd.weight":
            if "output.weight" in names:
                continue  # only one row is read per token
            read_bytes += elems * BYTES[t]  # tied: the output projection reads it all
            continue
        if name != "output.weight":
            mat_elems += elems  # block matrices: every prompt token multiplies them
        read_bytes += elems * BYTES[t]
    # Prefill of 512 tokens: matrices, plus causal attention (q·k and p·v: 2 x 2 x keys x q_dim,
    # 256.5 keys on average); logits for the last token only (negligible).
    flop_per_token = 2.0 * mat_elems + 4.0 * 256.5 * n_embd * n_layer
    # Decode after 512 tokens: 128 steps attending to 512 .. 639 positions (576 on average).
    read_bytes += 2 * n_layer * 576.0 * kv_dim * 4
    peak = peak_best[gemm_type]
    base = label.rstrip("*")
    ref = LLAMA_CPP.get((preset, "f16" if base == "bf16" else base))
    rows.append([
        preset, label,
        f"{pp:.1f} ± {pp_sd:.1f}" if pp else "-",
        f"{tg:.2f} ± {tg_sd:.2f}" if tg else "-",
        f"{pp * flop_per_token / 1e9:.0f} GF/s {100 * pp * flop_per_token / 1e9 / peak_near:.0f}% ({peak_near:.0f})" if pp and peak_near else "-",
        f"{100 * pp * flop_per_token / 1e9 / peak:.0f}%" if pp and peak else "-",
        f"{tg * read_bytes / 1e9:.1f} GB/s {100 * tg * read_bytes / 1e9 / bw_near:.0f}% ({bw_near:.0f})" if tg else "-",
        f"{100 * tg * read_bytes / 1e9 / bw_best:.0f}%" if tg and bw_best else "-",
        f"{100 * tg * read_bytes / 1e9 / fbw_near:.0f}% ({fbw_near:.0f})" if tg and fbw_near else "-",
        f"{float(rss.group(1)):.0f} MiB" if rss else "-",
        f"{ref[0]:g} / {ref[1]:g}" if ref else "-",
        f"{pp / ref[0]:.2f}x / {tg / ref[1]:.2f}x" if ref and pp and tg else "-",
    ])

head = ["model", "type", "pp512 tok/s", "tg128 tok/s", "pp/peak (peak near)", "pp/peak max", "tg/bw (bw near)", "tg/bw max", "tg/file bw", "peak RSS", "llama.cpp pp/tg", "ours/llama.cpp"]
width = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
print("  ".join(h.ljust(w) for h, w in zip(head, width)))
for r in rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, width)))
print(f"limits: f32 GEMM {limits.get('gemm_f32', 0):.0f} GFLOP/s, bf16 GEMM {limits.get('gemm_bf16', 0):.0f} GFLOP/s, "
      f"int8 GEMM {limits.get('gemm_s8', 0):.0f} GOP/s, read bandwidth {limits.get('bandwidth', 0):.1f} GB/s (all threads); "
      f"highest in the run: f32 GEMM {peak_best['f32']:.0f} GFLOP/s, bf16 GEMM {peak_best['bf16']:.0f} GFLOP/s, "
      f"read bandwidth {bw_best:.1f} GB/s")
print("f16*, bf16*, q8_0*: BACKPROMPT_MATMUL=bf16 (activations, weights and attention operands rounded to bf16 in prefill; not exact); "
      "q8_0* also BACKPROMPT_DECODE=int8 (decode's q8_0 products on activations quantized to int8; not exact); "
      "bf16 rows are compared with llama.cpp's f16 figures")
EOF
echo "(logs in $out/speed-*.txt; on a shared machine figures are noisy: compare runs made under the same load)"
