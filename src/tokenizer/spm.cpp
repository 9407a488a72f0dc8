// SentencePiece-style BPE by token scores, with byte fallback.
#include "tokenizer/spm.h"

#include <queue>

#include "backprompt/error.h"
#include "tokenizer/utf8.h"

namespace backprompt {

namespace {

constexpr std::string_view SPACE_MARK = "\xE2\x96\x81";  // U+2581 LOWER ONE EIGHTH BLOCK, "▁"

// The byte of a token written "<0xNN>" (upper-case hex, as SentencePiece writes them), or -1.
int parse_byte_token(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  int value = 0;
  for (char c : text.substr(3, 2)) {
    value *= 16;
    if (c >= '0' && c <= '9') value += c - '0';
    else if (c >= 'A' && c <= 'F') value += c - 'A' + 10;
    else return -1;
  }
  return value;
}

std::string replace_space_marks(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    if (text.substr(i, SPACE_MARK.size()) == SPACE_MARK) {
      out += ' ';
      i += SPACE_MARK.size();
    } else {
      out += text[i++];
    }
  }
  return out;
}

}  // namespace

SpmModel::SpmModel(const TokenizerData& data) : unk_id_(data.unk_id) {
  const size_t n_vocab = data.tokens.size();
  scores_ = data.scores;
  scores_.resize(n_vocab, 0.0f);  // absent scores count as 0 (the constructor's caller validated sizes)
  byte_token_.fill(-1);
  pieces_.resize(n_vocab);
  token_ids_.reserve(n_vocab);
  const bool typed = !data.token_types.empty();
  for (size_t id = 0; id < n_vocab; ++id) {
    const std::string& text = data.tokens[id];
    const auto type = static_cast<TokenType>(typed ? data.token_types[id] : static_cast<int32_t>(TokenType::NORMAL));
    const int byte = type == TokenType::BYTE || !typed ? parse_byte_token(text) : -1;
    if (byte >= 0) {
      if (byte_token_[static_cast<size_t>(byte)] < 0) byte_token_[static_cast<size_t>(byte)] = static_cast<int32_t>(id);
      pieces_[id] = std::string(1, static_cast<char>(byte));
      continue;
    }
    if (type == TokenType::BYTE) {
      throw Error(ErrorCode::CORRUPT_FILE, "tokenizer.ggml.tokens[" + std::to_string(id) + "] = '" + text +
                                               "': a byte token must be written <0xNN>");
    }
    // Without types, the special ids stand for control tokens.
    const bool control = type == TokenType::CONTROL ||
                         (!typed && (static_cast<int32_t>(id) == data.bos_id || static_cast<int32_t>(id) == data.eos_id ||
                                     static_cast<int32_t>(id) == data.unk_id));
    if (control) continue;  // decodes to nothing, never produced from text
    if (type == TokenType::USER_DEFINED) {
      pieces_[id] = text;
    } else {
      pieces_[id] = replace_space_marks(text);
    }
    if (type == TokenType::NORMAL || type == TokenType::USER_DEFINED) {
      token_ids_.emplace(text, static_cast<int32_t>(id));
    }
  }
}

void SpmModel::encode(std::string_view text, bool add_space_prefix, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::string escaped;  // the text with "▁" for every space, and a leading "▁"
  escaped.reserve(text.size() + 3 * 8);
  if (add_space_prefix) escaped.append(SPACE_MARK);
  for (char c : text) {
    if (c == ' ') escaped.append(SPACE_MARK);
    else escaped += c;
  }

  // Symbols: contiguous byte ranges of `escaped`, initially one UTF-8 character each, linked
  // in order; a merged-away symbol has n == 0.
  struct Symbol {
    size_t start, n;
    int32_t prev, next;
  };
  std::vector<Symbol> symbols;  // [n_chars]
  symbols.reserve(escaped.size());
  for (size_t i = 0; i < escaped.size();) {
    const size_t len = utf8::char_len(escaped, i);
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({i, len, index - 1, index + 1});
    i += len;
  }
  symbols.back().next = -1;

  // Candidate merges: highest score first, then leftmost. An entry is stale once either side
  // has changed (its length then differs from the recorded one).
  struct Candidate {
    float score;
    int32_t left, right;
    size_t n;
    bool operator<(const Candidate& o) const { return score != o.score ? score < o.score : left > o.left; }
  };
  std::priority_queue<Candidate> queue;
  const std::string_view view = escaped;
  const auto consider = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = symbols[static_cast<size_t>(left)];
    const Symbol& r = symbols[static_cast<size_t>(right)];
    const auto it = token_ids_.find(view.substr(l.start, l.n + r.n));
    if (it != token_ids_.end()) queue.push({scores_[static_cast<size_t>(it->second)], left, right, l.n + r.n});
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) consider(static_cast<int32_t>(i), static_cast<int32_t>(i + 1));

  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = symbols[static_cast<size_t>(c.left)];
    Symbol& r = symbols[static_cast<size_t>(c.right)];
    if (l.n == 0 || r.n == 0 || l.next != c.right || l.n + r.n != c.n) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (l.next >= 0) symbols[static_cast<size_t>(l.next)].prev = c.left;
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }

  for (int32_t i = 0; i >= 0; i = symbols[static_cast<size_t>(i)].next) {
    const Symbol& s = symbols[static_cast<size_t>(i)];
    emit_symbol(view.substr(s.start, s.n), out);
  }
}

void SpmModel::emit_symbol(std::string_view symbol, std::vector<int32_t>& out) const {
  if (const auto it = token_ids_.find(symbol); it != token_ids_.end()) {
    out.push_back(it->second);
    return;
  }
  bool all_bytes = true;
  for (char c : symbol) all_bytes = all_bytes && byte_token_[static_cast<uint8_t>(c)] >= 0;
  if (all_bytes) {
    for (char c : symbol) out.push_back(byte_token_[static_cast<uint8_t>(c)]);
  } else if (unk_id_ >= 0) {
    out.push_back(unk_id_);
  } else {
    throw Error(ErrorCode::INVALID_ARGUMENT, "tokenizer: the text has a character that is not in the vocabulary, "
                                             "and the vocabulary has neither byte tokens nor an unknown token");
  }
}

}  // namespace backprompt
