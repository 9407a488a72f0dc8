// The loaded form of a model: its GGUF mapping, hyperparameters, tokenizer and views of every
// weight. Matrices are views into the mmap (any DType); 1-D tensors (norms, biases) are small and
// converted to owned f32 at load.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backprompt/model.h"
#include "gguf/gguf.h"
#include "tensor/kernels.h"

namespace backprompt::detail {

struct LayerWeights {
  std::vector<float> attn_norm_w, attn_norm_b;  // [n_embd] (b: gpt2 only)
  std::vector<float> ffn_norm_w, ffn_norm_b;    // [n_embd] (b: gpt2 only)
  // gpt2
  MatrixView attn_qkv;                          // [3*n_embd, n_embd]
  std::vector<float> attn_qkv_b;                // [3*n_embd]
  std::vector<float> attn_out_b;                // [n_embd]
  std::vector<float> ffn_up_b;                  // [n_ff]
  std::vector<float> ffn_down_b;                // [n_embd]
  // llama
  MatrixView attn_q;                            // [n_head*head_dim, n_embd]
  MatrixView attn_k, attn_v;                    // [kv_dim, n_embd]
  MatrixView ffn_gate;                          // [n_ff, n_embd]
  // both
  MatrixView attn_out;                          // [n_embd, n_embd]
  MatrixView ffn_up;                            // [n_ff, n_embd]
  MatrixView ffn_down;                          // [n_embd, n_ff]
};

struct ModelImpl {
  ModelImpl() = default;
  ModelImpl(const ModelImpl&) = delete;
  ModelImpl& operator=(const ModelImpl&) = delete;
  // Releases the packed copies of its weights (matmul_weights_released) before the file goes.
  ~ModelImpl();

  std::string path;
  std::unique_ptr<gguf::File> file;
  ModelConfig config;
  std::unique_ptr<Tokenizer> tokenizer;
  MatrixView token_embd;                        // [n_vocab, n_embd]
  MatrixView position_embd;                     // gpt2: [n_ctx, n_embd]
  MatrixView output;                            // [n_vocab, n_embd] (token_embd when tied)
  std::vector<float> output_norm_w, output_norm_b;  // [n_embd]
  std::vector<LayerWeights> layers;             // [n_layer]
  DType weight_type = DType::F32;
  uint64_t n_params = 0;
  uint64_t fingerprint = 0;
};

}  // namespace backprompt::detail
