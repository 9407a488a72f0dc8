# Sourced by the bench scripts (from the repository root): the build and the generated
# benchmark models.
#
#   bench_build NAME          builds backprompt (Release, ./build) into bench/out/NAME-build.log,
#                             prints the log's end and exits on failure; sets $bp, $out, $models
#   model_file PRESET DTYPE   prints the path of PRESET (llama-110m, tinyllama-1.1b, gpt2-124m)
#                             with DTYPE weights, making it first with `backprompt make-model`
#                             (seed 1, the real vocabulary from ../shared/models/ggml-vocab when
#                             present, else a byte vocabulary)
#   model_types PRESET        the weight types the tables measure for PRESET
#
# model_file needs $bp and $models (bench_build sets them) and $root (the repository).

bench_build() {
  out=bench/out
  models=$out/models
  mkdir -p "$models"
  echo "== build (Release, ./build)"
  scripts/build.sh >"$out/$1-build.log" 2>&1 ||
    { tail -30 "$out/$1-build.log"; echo "$0: build failed (log: $out/$1-build.log)" >&2; exit 1; }
  bp=build/backprompt
}
model_file() {
  local preset=$1 dtype=$2 arch=llama vocab=ggml-vocab-llama-spm.gguf tag=spm
  local vocab_dir=${BACKPROMPT_TEST_DATA:-$root/../shared/models}/ggml-vocab
  if [ "$preset" = gpt2-124m ]; then arch=gpt2 vocab=ggml-vocab-gpt-2.gguf tag=gpt2; fi
  local vocab_arg=()
  if [ -f "$vocab_dir/$vocab" ]; then vocab_arg=(--vocab "$vocab_dir/$vocab"); else tag=bytes; fi
  local f=$models/$preset-$dtype-$tag.gguf
  if [ ! -f "$f" ]; then
    echo "   making $f" >&2
    "$bp" make-model --arch "$arch" --preset "$preset" --dtype "$dtype" "${vocab_arg[@]}" --seed 1 -o "$f" >&2
  fi
  echo "$f"
}

model_types() {
  case $1 in
    llama-110m) echo "f32 f16 bf16 q8_0" ;;
    tinyllama-1.1b) if [ "${BENCH_SKIP_BIG:-0}" = 1 ]; then echo "f16 bf16 q8_0"; else echo "f32 f16 bf16 q8_0"; fi ;;
    gpt2-124m) echo "f32 f16" ;;
    *) echo "unknown model $1 (llama-110m, tinyllama-1.1b, gpt2-124m)" >&2; return 2 ;;
  esac
}
