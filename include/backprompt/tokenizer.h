// Tokenizers read from GGUF metadata:
//   tokenizer.ggml.model = "gpt2"  -> byte-level BPE with ranked merges and a pre-tokenizer
//                                    regex chosen by tokenizer.ggml.pre ("gpt-2", "llama-bpe"/"llama3")
//   tokenizer.ggml.model = "llama" -> SentencePiece-style BPE by token scores, byte fallback
//                                    (<0xNN>), "▁" for spaces and a leading "▁" prefix.
//
// Thread-safety: immutable after construction; all const methods may be called concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace backprompt {

enum class TokenizerKind { GPT2_BPE, LLAMA_SPM };

// Token types as GGUF stores them (tokenizer.ggml.token_type).
enum class TokenType : int32_t { NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6 };

// Everything a tokenizer is made of; what the GGUF metadata holds.
struct TokenizerData {
  TokenizerKind kind = TokenizerKind::GPT2_BPE;
  std::string pre = "gpt-2";               // pre-tokenizer name (GPT2_BPE only)
  std::vector<std::string> tokens;         // id -> token text (GPT-2: byte-to-unicode mapped)
  std::vector<float> scores;               // id -> score (LLAMA_SPM), may be empty for GPT2_BPE
  std::vector<int32_t> token_types;        // id -> TokenType, may be empty
  std::vector<std::string> merges;         // "a b" lines in rank order (GPT2_BPE)
  int32_t bos_id = -1, eos_id = -1, unk_id = -1;
  bool add_bos = false;                    // tokenizer.ggml.add_bos_token (default by kind)
  bool add_space_prefix = true;            // LLAMA_SPM: prepend "▁" to the text
};

struct EncodeOptions {
  bool add_bos = false;           // prepend BOS (the CLI passes the model's add_bos())
  bool add_space_prefix = true;   // LLAMA_SPM: prefix "▁" (only the first segment of a text gets it)
};

class Tokenizer {
 public:
  // Throws Error(CORRUPT_FILE) if the data is inconsistent (unknown pre-tokenizer is UNSUPPORTED).
  explicit Tokenizer(TokenizerData data);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  TokenizerKind kind() const;
  int32_t n_vocab() const;
  int32_t bos() const;   // -1 if none
  int32_t eos() const;   // -1 if none
  bool add_bos() const;  // whether a text should start with BOS by the model's metadata

  // Special tokens written in the text (e.g. "<s>") are not parsed: text is always text.
  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& opt = {}) const;
  // The bytes a token stands for (byte tokens give their byte; control tokens give "").
  std::string token_to_piece(int32_t id) const;
  // Concatenated pieces; for LLAMA_SPM, the leading space of the first piece is dropped when
  // `strip_leading_space` (mirrors add_space_prefix on encode).
  std::string decode(std::span<const int32_t> ids, bool strip_leading_space = false) const;

  // Hash of everything that determines tokenization (kind, pre, tokens, scores, types, merges,
  // special ids, flags).
  uint64_t fingerprint() const;
  const TokenizerData& data() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace backprompt
