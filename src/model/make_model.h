// Deterministic random-weight models in real shapes, written as GGUF (`backprompt make-model`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backprompt/model.h"
#include "tensor/dtype.h"

namespace backprompt {

struct MakeModelOptions {
  Arch arch = Arch::LLAMA;
  std::string preset = "tiny";   // see make_model_presets()
  DType dtype = DType::F32;      // type of the 2-D weight matrices (norms/biases stay f32)
  std::string vocab_path;        // GGUF whose tokenizer.* metadata is copied; empty = built-in byte vocab
  uint64_t seed = 1;
};

// Preset names valid for `arch` (e.g. "tiny", "gpt2-124m" / "llama-110m", "tinyllama-1.1b").
std::vector<std::string> make_model_presets(Arch arch);

// Writes the model to `out_path` atomically. Same options -> byte-identical file.
// Error(INVALID_ARGUMENT) for an unknown preset or a preset/arch mismatch; IO/CORRUPT errors from
// reading the vocabulary file.
void make_model(const MakeModelOptions& opt, const std::string& out_path);

}  // namespace backprompt
