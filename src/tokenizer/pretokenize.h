// Pre-tokenizers for byte-level BPE: the regex that cuts a text into words before merges.
//
// Thread-safety: a PreTokenizer is immutable after construction; split() may be called
// concurrently (each call uses its own match data).
#pragma once

#include <optional>
#include <string_view>
#include <vector>

struct pcre2_real_code_8;

namespace backprompt {

enum class PreTokenizerKind {
  GPT2,    // OpenAI GPT-2: 's|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  LLAMA3,  // Meta Llama 3: case-insensitive contractions, \p{N}{1,3}, newline-aware runs
};

// The kind for a tokenizer.ggml.pre value ("gpt-2"/"default" -> GPT2, "llama-bpe"/"llama3"/
// "llama-v3" -> LLAMA3); nullopt when unknown.
std::optional<PreTokenizerKind> pre_tokenizer_from_name(std::string_view name);
// Canonical name ("gpt-2", "llama-bpe"): what the tokenizer fingerprint hashes.
const char* pre_tokenizer_name(PreTokenizerKind kind);

class PreTokenizer {
 public:
  explicit PreTokenizer(PreTokenizerKind kind);
  ~PreTokenizer();
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  PreTokenizerKind kind() const { return kind_; }
  // Appends the words of `text` to `words`, in order; their concatenation is exactly `text`.
  // Bytes that are not valid UTF-8 never match the regex; each run of them becomes a word.
  void split(std::string_view text, std::vector<std::string_view>& words) const;

 private:
  PreTokenizerKind kind_;
  pcre2_real_code_8* code_ = nullptr;
  bool jit_ = false;
};

}  // namespace backprompt
