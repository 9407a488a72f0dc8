// backprompt::Model: immutable weights, hyperparameters and tokenizer of one GGUF file.
//
// Weights stay in the file's mmap; nothing is copied unless a kernel needs a repacked layout.
// Two fingerprints are computed at load and key every cached state: one over the
// hyperparameters and all tensor data, one over the tokenizer.
//
// Thread-safety: a Model is immutable after load(); share it freely (std::shared_ptr) and call
// its const methods from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "backprompt/tokenizer.h"

namespace backprompt {

enum class Arch { GPT2, LLAMA };
const char* arch_name(Arch a);

struct ModelConfig {
  Arch arch = Arch::LLAMA;
  int32_t n_vocab = 0;
  int32_t n_ctx = 0;        // context length: positions are 0 .. n_ctx-1
  int32_t n_embd = 0;
  int32_t n_layer = 0;
  int32_t n_head = 0;
  int32_t n_kv_head = 0;    // == n_head unless grouped-query attention
  int32_t head_dim = 0;     // n_embd / n_head
  int32_t n_ff = 0;
  float norm_eps = 1e-5f;
  int32_t rope_dim = 0;     // llama: rotated dimensions per head (rope.dimension_count)
  float rope_base = 10000.0f;
  int32_t kv_dim() const { return n_kv_head * head_dim; }
};

namespace detail { struct ModelImpl; }

class Model {
 public:
  // Maps and validates `path`. Error(IO_ERROR / CORRUPT_FILE / UNSUPPORTED) naming the file and
  // what is wrong: unknown architecture, missing or mis-shaped tensor, bad metadata.
  static std::shared_ptr<Model> load(const std::string& path);
  ~Model();

  const ModelConfig& config() const;
  const Tokenizer& tokenizer() const;
  const std::string& path() const;
  uint64_t fingerprint() const;            // hyperparameters + all tensor bytes
  uint64_t tokenizer_fingerprint() const;  // == tokenizer().fingerprint()
  std::string weight_type_name() const;    // type of the block matrices, e.g. "f16"
  uint64_t n_params() const;

  const detail::ModelImpl& impl() const { return *impl_; }

 private:
  explicit Model(std::unique_ptr<detail::ModelImpl> impl);
  std::unique_ptr<detail::ModelImpl> impl_;
};

}  // namespace backprompt
