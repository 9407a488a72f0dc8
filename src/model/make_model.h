// Deterministic random-weight models in real shapes, written as GGUF (`backprompt make-model`).
//
// Tensor names and metadata keys are llama.cpp's (not tested against llama.cpp). GPT-2 ties the
// output projection to token_embd; Llama has a separate `output` tensor. Weights are normal:
// matrices with std 1/sqrt(n_in) (0.02-0.04 at real widths; activations keep unit scale at any
// width), the block projections into the residual stream further scaled by 1/sqrt(2 n_layer),
// embeddings 0.02; norm weights near 1, biases near 0. Every row of every tensor has its own
// random stream (seed, tensor name, row), so the file does not depend on the number of threads.
// Thread-safety: make_model() may be called concurrently for different output paths.
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

// What was written.
struct MakeModelResult {
  ModelConfig config;     // n_vocab from the vocabulary
  uint64_t n_params = 0;  // elements of all tensors
};

// Preset names valid for `arch` (e.g. "tiny", "gpt2-124m" / "llama-110m", "tinyllama-1.1b").
std::vector<std::string> make_model_presets(Arch arch);

// Writes the model to `out_path` atomically. Same options -> byte-identical file.
// Error(INVALID_ARGUMENT) for an unknown preset or a preset/arch mismatch; IO/CORRUPT errors from
// reading the vocabulary file.
MakeModelResult make_model(const MakeModelOptions& opt, const std::string& out_path);

}  // namespace backprompt
