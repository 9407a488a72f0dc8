#!/usr/bin/env bash
# The main job on built-in defaults: build, make a small random-weight model, generate from it,
# then score completions of one prompt through the K/V cache (the prompt is computed once).
# With the trained stories260K model beside the repository, the same is shown on real text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
out=build/demo
mkdir -p "$out"
bp=./build/backprompt

echo "== make-model: a tiny Llama with random weights and the built-in byte vocabulary"
"$bp" make-model --arch llama --preset tiny --dtype f32 -o "$out/tiny-llama.gguf"

echo "== generate (greedy, 24 tokens; random weights give random text)"
"$bp" generate -m "$out/tiny-llama.gguf" -p "Hello there." -n 24 --temp 0 -v
echo

printf ' Senator\n General\n' > "$out/choices.txt"
printf ' Amidala\n Kenobi...\n' > "$out/endings.txt"
echo "== score: \"Hello there.\" x 2 choices x 2 endings, one batch, prompt computed once"
"$bp" score -m "$out/tiny-llama.gguf" --prompt "Hello there." --choices "$out/choices.txt" --endings "$out/endings.txt"

echo "== snapshot: cache the prompt once, then continue it in another process"
"$bp" generate -m "$out/tiny-llama.gguf" -p "Hello there." --cache-prompt "$out/prompt.bps"
echo
"$bp" inspect "$out/prompt.bps" | head -8
"$bp" generate -m "$out/tiny-llama.gguf" --restore-prompt "$out/prompt.bps" -p " General" -n 16 --temp 0
echo

echo "== store: the second run loads the prompt's K/V from disk instead of computing them"
rm -rf "$out/kv-store"
for run in first second; do
  printf '%s run: ' "$run"
  "$bp" score -m "$out/tiny-llama.gguf" --prompt "Hello there." --choices "$out/choices.txt" \
    --endings "$out/endings.txt" --store "dir:$out/kv-store" 2>&1 >/dev/null | tail -1
done

stories=../shared/models/stories260k/stories260K.gguf
if [ -f "$stories" ]; then
  echo "== the trained stories260K model: greedy continuation"
  "$bp" generate -m "$stories" -p "Once upon a time" -n 60 --temp 0
  echo
  printf ' girl\n dog\n big red ball\n' > "$out/story-choices.txt"
  printf ' named Lily.\n who liked to play.\n' > "$out/story-endings.txt"
  echo "== score on stories260K"
  "$bp" score -m "$stories" --prompt "Once upon a time, there was a little" \
    --choices "$out/story-choices.txt" --endings "$out/story-endings.txt"
fi
