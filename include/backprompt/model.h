// backprompt::Model: immutable weights, hyperparameters and tokenizer of one GGUF file.
//
// Weights stay in the file's mmap (WeightPlacement::MAPPED) or are read once into memory of the
// model's own on 2 MiB pages (MEMORY), which models decode faster from; by default (AUTO) a model
// of 64 MiB or more goes to memory when it fits comfortably. No other copy is made.
// Two fingerprints are computed at load and key every cached state: one over the
// hyperparameters and all tensor data, one over the tokenizer.
//
// Thread-safety: a Model is immutable after load(); share it freely (std::shared_ptr) and call
// its const methods from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

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

// Where the weights live after load. Decode reads every weight once per token. Read through the
// file's mapping, a 1 GB model spans a quarter of a million 4 KiB pages of the page cache; read
// from a copy on transparent huge pages it spans 500, and decode of a 1.1B-parameter model ran
// 1.1-1.7x faster that way on a 2-core VM, 1.05-1.1x for 110-124M models (bench/SPEED.md). The
// copy is the process's own memory (the page cache may still hold the file too, as reclaimable
// cache); a mapping's pages are shared by every process that maps the file.
enum class WeightPlacement {
  AUTO,    // MEMORY for files of at least 64 MiB that take at most half the memory available,
           // when the system has transparent huge pages; MAPPED otherwise (or if allocating fails)
  MAPPED,  // a read-only mapping of the file; load reads only what validation and hashing touch
  MEMORY,  // the whole file read into memory that asks for transparent huge pages
};
const char* weight_placement_name(WeightPlacement p);                          // "auto", "mmap", "memory"
std::optional<WeightPlacement> weight_placement_from_name(std::string_view s);  // inverse

struct LoadOptions {
  WeightPlacement weights = WeightPlacement::AUTO;
};

namespace detail {
struct ModelImpl;
// AUTO's choice for a file of `file_bytes` with `available_bytes` of memory available (0: not
// known) and transparent huge pages on (`huge_pages`): MEMORY or MAPPED.
WeightPlacement auto_placement(uint64_t file_bytes, uint64_t available_bytes, bool huge_pages);
}  // namespace detail

class Model {
 public:
  // Maps (or reads, see WeightPlacement) and validates `path`. Error(IO_ERROR / CORRUPT_FILE /
  // UNSUPPORTED) naming the file and what is wrong: unknown architecture, missing or mis-shaped
  // tensor, bad metadata; Error(OUT_OF_MEMORY) when MEMORY was asked for and cannot be had.
  static std::shared_ptr<Model> load(const std::string& path, const LoadOptions& options = {});
  ~Model();

  const ModelConfig& config() const;
  const Tokenizer& tokenizer() const;
  const std::string& path() const;
  uint64_t fingerprint() const;            // hyperparameters + all tensor bytes
  uint64_t tokenizer_fingerprint() const;  // == tokenizer().fingerprint()
  std::string weight_type_name() const;    // type of the block matrices, e.g. "f16"
  uint64_t n_params() const;
  WeightPlacement weight_placement() const;  // MAPPED or MEMORY: where load put the weights

  const detail::ModelImpl& impl() const { return *impl_; }

 private:
  explicit Model(std::unique_ptr<detail::ModelImpl> impl);
  std::unique_ptr<detail::ModelImpl> impl_;
};

}  // namespace backprompt
