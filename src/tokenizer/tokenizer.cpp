// Tokenizer: validation of TokenizerData, dispatch to byte-level BPE or SentencePiece-style
// BPE, decoding and the fingerprint.
#include "backprompt/tokenizer.h"

#include <xxhash.h>

#include <cstring>

#include "backprompt/error.h"
#include "tokenizer/bpe.h"
#include "tokenizer/spm.h"

namespace backprompt {

struct Tokenizer::Impl {
  TokenizerData data;
  std::unique_ptr<BpeModel> bpe;  // set for GPT2_BPE
  std::unique_ptr<SpmModel> spm;  // set for LLAMA_SPM
  uint64_t fingerprint = 0;
};

namespace {

void validate(TokenizerData& data) {
  const size_t n_vocab = data.tokens.size();
  if (n_vocab == 0) throw Error(ErrorCode::CORRUPT_FILE, "tokenizer.ggml.tokens: the vocabulary is empty");
  if (n_vocab > static_cast<size_t>(INT32_MAX)) {
    throw Error(ErrorCode::CORRUPT_FILE, "tokenizer.ggml.tokens: too many tokens (" + std::to_string(n_vocab) + ")");
  }
  if (!data.scores.empty() && data.scores.size() != n_vocab) {
    throw Error(ErrorCode::CORRUPT_FILE, "tokenizer.ggml.scores: " + std::to_string(data.scores.size()) +
                                             " scores for " + std::to_string(n_vocab) + " tokens");
  }
  if (!data.token_types.empty() && data.token_types.size() != n_vocab) {
    throw Error(ErrorCode::CORRUPT_FILE, "tokenizer.ggml.token_type: " + std::to_string(data.token_types.size()) +
                                             " types for " + std::to_string(n_vocab) + " tokens");
  }
  for (size_t id = 0; id < data.token_types.size(); ++id) {
    int32_t& type = data.token_types[id];
    if (type == 0) type = static_cast<int32_t>(TokenType::NORMAL);  // "undefined" in older files
    if (type < static_cast<int32_t>(TokenType::NORMAL) || type > static_cast<int32_t>(TokenType::BYTE)) {
      throw Error(ErrorCode::CORRUPT_FILE, "tokenizer.ggml.token_type[" + std::to_string(id) + "]: unknown type " +
                                               std::to_string(type));
    }
  }
  const auto check_id = [&](int32_t id, const char* key) {
    if (id < -1 || id >= static_cast<int32_t>(n_vocab)) {
      throw Error(ErrorCode::CORRUPT_FILE, std::string(key) + ": id " + std::to_string(id) + " is not in a vocabulary of " +
                                               std::to_string(n_vocab) + " tokens");
    }
  };
  check_id(data.bos_id, "tokenizer.ggml.bos_token_id");
  check_id(data.eos_id, "tokenizer.ggml.eos_token_id");
  check_id(data.unk_id, "tokenizer.ggml.unknown_token_id");
}

class Hasher {
 public:
  Hasher() : state_(XXH3_createState()) {
    if (!state_) throw Error(ErrorCode::OUT_OF_MEMORY, "tokenizer: cannot allocate a hash state");
    XXH3_64bits_reset(state_);
  }
  ~Hasher() { XXH3_freeState(state_); }
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;

  void bytes(const void* p, size_t n) { XXH3_64bits_update(state_, p, n); }
  void u64(uint64_t v) { bytes(&v, sizeof(v)); }
  void str(std::string_view s) {  // length-prefixed, so that ["ab","c"] != ["a","bc"]
    u64(s.size());
    bytes(s.data(), s.size());
  }
  uint64_t digest() const { return XXH3_64bits_digest(state_); }

 private:
  XXH3_state_t* state_;
};

uint64_t compute_fingerprint(const TokenizerData& data, const char* pre_name) {
  Hasher h;
  h.str("backprompt-tokenizer-v1");
  h.u64(static_cast<uint64_t>(data.kind));
  h.str(pre_name);
  h.u64(data.tokens.size());
  for (const std::string& t : data.tokens) h.str(t);
  h.u64(data.scores.size());
  for (float s : data.scores) {
    uint32_t bits;
    std::memcpy(&bits, &s, sizeof(bits));
    h.u64(bits);
  }
  h.u64(data.token_types.size());
  for (int32_t t : data.token_types) h.u64(static_cast<uint32_t>(t));
  h.u64(data.merges.size());
  for (const std::string& m : data.merges) h.str(m);
  for (int32_t id : {data.bos_id, data.eos_id, data.unk_id}) h.u64(static_cast<uint32_t>(id));
  h.u64(data.add_bos ? 1 : 0);
  h.u64(data.add_space_prefix ? 1 : 0);
  return h.digest();
}

}  // namespace

Tokenizer::Tokenizer(TokenizerData data) : impl_(std::make_unique<Impl>()) {
  validate(data);
  impl_->data = std::move(data);
  const TokenizerData& d = impl_->data;
  const char* pre_name = "";
  switch (d.kind) {
    case TokenizerKind::GPT2_BPE:
      impl_->bpe = std::make_unique<BpeModel>(d);
      pre_name = pre_tokenizer_name(impl_->bpe->pre_kind());
      break;
    case TokenizerKind::LLAMA_SPM:
      impl_->spm = std::make_unique<SpmModel>(d);
      break;
  }
  BP_ASSERT(impl_->bpe || impl_->spm);
  impl_->fingerprint = compute_fingerprint(d, pre_name);
}

Tokenizer::~Tokenizer() = default;

TokenizerKind Tokenizer::kind() const { return impl_->data.kind; }
int32_t Tokenizer::n_vocab() const { return static_cast<int32_t>(impl_->data.tokens.size()); }
int32_t Tokenizer::bos() const { return impl_->data.bos_id; }
int32_t Tokenizer::eos() const { return impl_->data.eos_id; }
bool Tokenizer::add_bos() const { return impl_->data.add_bos; }
uint64_t Tokenizer::fingerprint() const { return impl_->fingerprint; }
const TokenizerData& Tokenizer::data() const { return impl_->data; }

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& opt) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (opt.add_bos) {
    if (impl_->data.bos_id < 0) throw Error(ErrorCode::INVALID_ARGUMENT, "tokenizer: BOS requested, but the vocabulary has none");
    ids.push_back(impl_->data.bos_id);
  }
  if (impl_->bpe) {
    impl_->bpe->encode(text, ids);
  } else {
    impl_->spm->encode(text, opt.add_space_prefix && impl_->data.add_space_prefix, ids);
  }
  return ids;
}

std::string Tokenizer::token_to_piece(int32_t id) const {
  if (id < 0 || id >= n_vocab()) {
    throw Error(ErrorCode::INVALID_ARGUMENT, "tokenizer: token id " + std::to_string(id) + " is not in a vocabulary of " +
                                                 std::to_string(n_vocab()) + " tokens");
  }
  return impl_->bpe ? impl_->bpe->piece(id) : impl_->spm->piece(id);
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool strip_leading_space) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= n_vocab()) {
      throw Error(ErrorCode::INVALID_ARGUMENT, "tokenizer: token id " + std::to_string(id) + " is not in a vocabulary of " +
                                                   std::to_string(n_vocab()) + " tokens");
    }
    out += impl_->bpe ? impl_->bpe->piece(id) : impl_->spm->piece(id);
  }
  if (strip_leading_space && impl_->spm && impl_->data.add_space_prefix && !out.empty() && out[0] == ' ') {
    out.erase(0, 1);
  }
  return out;
}

}  // namespace backprompt
