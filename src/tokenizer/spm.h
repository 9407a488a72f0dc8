// SentencePiece-style BPE (Llama 1/2, Phi-3, TinyStories): spaces become "▁" (U+2581), the
// text gets a leading "▁", and starting from single UTF-8 characters the adjacent pair whose
// concatenation is a vocabulary token with the highest score is merged (ties: leftmost) until
// no pair is a token. A final symbol that is not a token falls back to its bytes (<0xNN>).
//
// Thread-safety: immutable after construction; encode() may be called concurrently.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "backprompt/tokenizer.h"
#include "tokenizer/token_map.h"

namespace backprompt {

class SpmModel {
 public:
  explicit SpmModel(const TokenizerData& data);

  // Appends the ids of `text` to `out`. Error(INVALID_ARGUMENT) if a character is not in the
  // vocabulary and neither its bytes nor an unknown token can stand for it.
  void encode(std::string_view text, bool add_space_prefix, std::vector<int32_t>& out) const;
  // The bytes token `id` stands for: "▁" -> " ", <0xNN> -> that byte, control tokens -> "".
  const std::string& piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }

 private:
  void emit_symbol(std::string_view symbol, std::vector<int32_t>& out) const;

  TokenMap token_ids_;                      // text -> id of tokens a merge may produce (normal, user-defined)
  std::vector<float> scores_;               // [n_vocab]
  std::array<int32_t, 256> byte_token_{};   // byte -> id of <0xNN>, or -1
  int32_t unk_id_ = -1;
  std::vector<std::string> pieces_;         // [n_vocab] decoded bytes of each token
};

}  // namespace backprompt
