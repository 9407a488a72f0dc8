// Byte-level BPE with ranked merges.
#include "tokenizer/bpe.h"

#include <queue>

#include "backprompt/error.h"
#include "tokenizer/utf8.h"

namespace backprompt {

uint32_t gpt2_byte_to_codepoint(uint8_t byte) {
  const auto printable = [](uint32_t b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174; };
  if (printable(byte)) return byte;
  uint32_t n_before = 0;  // non-printable bytes below this one
  for (uint32_t b = 0; b < byte; ++b) n_before += printable(b) ? 0 : 1;
  return 256 + n_before;
}

namespace {

// Code point -> byte, the inverse of gpt2_byte_to_codepoint (-1 where there is none).
std::vector<int> codepoint_to_byte_table() {
  std::vector<int> table(256 + 68, -1);
  for (int b = 0; b < 256; ++b) table[gpt2_byte_to_codepoint(static_cast<uint8_t>(b))] = b;
  return table;
}

// The bytes a mapped token text stands for. Characters outside the byte table (possible in
// added tokens) are kept as their UTF-8.
std::string unmap_token_text(std::string_view text, const std::vector<int>& cp_to_byte) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const size_t len = utf8::char_len(text, i);
    const uint32_t cp = len == 1 && static_cast<uint8_t>(text[i]) >= 0x80 ? 0x110000 : utf8::decode(text, i, len);
    if (cp < cp_to_byte.size() && cp_to_byte[cp] >= 0) {
      out += static_cast<char>(cp_to_byte[cp]);
    } else {
      out.append(text.substr(i, len));
    }
    i += len;
  }
  return out;
}

}  // namespace

BpeModel::BpeModel(const TokenizerData& data)
    : pre_([&] {
        const auto kind = pre_tokenizer_from_name(data.pre);
        if (!kind) throw Error(ErrorCode::UNSUPPORTED, "tokenizer.ggml.pre: unknown pre-tokenizer '" + data.pre + "'");
        return *kind;
      }()),
      ignore_merges_(pre_.kind() == PreTokenizerKind::LLAMA3) {
  const size_t n_vocab = data.tokens.size();
  token_ids_.reserve(n_vocab);
  for (size_t id = 0; id < n_vocab; ++id) token_ids_.emplace(data.tokens[id], static_cast<int32_t>(id));

  for (int b = 0; b < 256; ++b) {
    std::string text;
    utf8::append(text, gpt2_byte_to_codepoint(static_cast<uint8_t>(b)));
    const auto it = token_ids_.find(text);
    if (it == token_ids_.end()) {
      throw Error(ErrorCode::CORRUPT_FILE, "tokenizer.ggml.tokens: no token for byte " + std::to_string(b) +
                                               " ('" + text + "'), which byte-level BPE needs");
    }
    byte_token_[static_cast<size_t>(b)] = it->second;
  }

  merges_.reserve(data.merges.size());
  for (size_t rank = 0; rank < data.merges.size(); ++rank) {
    const std::string& line = data.merges[rank];
    const size_t space = line.size() > 1 ? line.find(' ', 1) : std::string::npos;
    const auto bad = [&](const std::string& why) {
      return Error(ErrorCode::CORRUPT_FILE,
                   "tokenizer.ggml.merges[" + std::to_string(rank) + "] = '" + line + "': " + why);
    };
    if (space == std::string::npos || space + 1 >= line.size()) throw bad("not two tokens separated by a space");
    const std::string_view left = std::string_view(line).substr(0, space);
    const std::string_view right = std::string_view(line).substr(space + 1);
    const auto l = token_ids_.find(left), r = token_ids_.find(right);
    if (l == token_ids_.end() || r == token_ids_.end()) throw bad("names a token not in the vocabulary");
    std::string joined;
    joined.reserve(left.size() + right.size());
    joined.append(left).append(right);
    const auto m = token_ids_.find(joined);
    if (m == token_ids_.end()) throw bad("the merged token is not in the vocabulary");
    // A pair listed twice keeps its first (best) rank.
    merges_.emplace(pair_key(l->second, r->second), Merge{static_cast<int32_t>(rank), m->second});
  }

  const std::vector<int> cp_to_byte = codepoint_to_byte_table();
  pieces_.resize(n_vocab);
  for (size_t id = 0; id < n_vocab; ++id) {
    const int32_t type = id < data.token_types.size() ? data.token_types[id] : static_cast<int32_t>(TokenType::NORMAL);
    if (type == static_cast<int32_t>(TokenType::CONTROL)) continue;            // decodes to nothing
    if (type == static_cast<int32_t>(TokenType::USER_DEFINED)) {
      pieces_[id] = data.tokens[id];                                            // added text, unmapped
    } else {
      pieces_[id] = unmap_token_text(data.tokens[id], cp_to_byte);
    }
  }
}

void BpeModel::encode(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<std::string_view> words;
  pre_.split(text, words);
  for (std::string_view word : words) encode_word(word, out);
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  const size_t n = word.size();
  if (n == 0) return;
  if (n == 1) {
    out.push_back(byte_token_[static_cast<uint8_t>(word[0])]);
    return;
  }
  if (ignore_merges_) {
    std::string mapped;
    for (char c : word) utf8::append(mapped, gpt2_byte_to_codepoint(static_cast<uint8_t>(c)));
    if (const auto it = token_ids_.find(mapped); it != token_ids_.end()) {
      out.push_back(it->second);
      return;
    }
  }

  // Symbols form a doubly linked list over the word's bytes; a merged-away symbol has id -1.
  std::vector<int32_t> ids(n), prev(n), next(n);  // [n] each
  for (size_t i = 0; i < n; ++i) {
    ids[i] = byte_token_[static_cast<uint8_t>(word[i])];
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }

  // Candidate merges: lowest rank first, then leftmost. An entry is stale once either side
  // has changed; it is then skipped when popped.
  struct Candidate {
    int32_t rank, left, right, left_id, right_id, result;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  const auto consider = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const auto it = merges_.find(pair_key(ids[left], ids[right]));
    if (it != merges_.end()) queue.push({it->second.rank, left, right, ids[left], ids[right], it->second.result});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(static_cast<int32_t>(i), static_cast<int32_t>(i + 1));

  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    if (ids[c.left] != c.left_id || ids[c.right] != c.right_id || next[c.left] != c.right) continue;
    ids[c.left] = c.result;
    ids[c.right] = -1;
    next[c.left] = next[c.right];
    if (next[c.left] >= 0) prev[next[c.left]] = c.left;
    consider(prev[c.left], c.left);
    consider(c.left, next[c.left]);
  }
  for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(ids[i]);
}

}  // namespace backprompt
