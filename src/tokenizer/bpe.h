// Byte-level BPE (GPT-2 and its descendants): bytes are mapped to printable code points
// (GPT-2's byte-to-unicode table), the text is cut into words by a pre-tokenizer regex, and the
// adjacent pair with the lowest merge rank is merged until no ranked pair remains.
//
// Thread-safety: immutable after construction; encode() may be called concurrently.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "backprompt/tokenizer.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/token_map.h"

namespace backprompt {

// GPT-2's reversible byte -> code point table: printable Latin-1 bytes map to themselves,
// the other 68 bytes to U+0100 upwards, in byte order.
uint32_t gpt2_byte_to_codepoint(uint8_t byte);

class BpeModel {
 public:
  // Error(CORRUPT_FILE) if a merge is malformed or names unknown tokens, or a byte has no
  // token; Error(UNSUPPORTED) for an unknown pre-tokenizer.
  explicit BpeModel(const TokenizerData& data);

  // Appends the ids of `text` (pre-tokenized, then merged word by word) to `out`.
  void encode(std::string_view text, std::vector<int32_t>& out) const;
  // The bytes token `id` stands for (control tokens: "").
  const std::string& piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }
  PreTokenizerKind pre_kind() const { return pre_.kind(); }

 private:
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  PreTokenizer pre_;
  bool ignore_merges_;                          // Llama 3: a word that is a token is not merged
  TokenMap token_ids_;                          // mapped token text -> id
  std::array<int32_t, 256> byte_token_{};       // byte -> id of its one-character token
  std::unordered_map<uint64_t, Merge> merges_;  // (left id, right id) -> rank and merged id
  std::vector<std::string> pieces_;             // [n_vocab] decoded bytes of each token
};

}  // namespace backprompt
