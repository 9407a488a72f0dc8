// Reading a tokenizer from GGUF metadata (tokenizer.ggml.*), with llama.cpp's defaults.
#include "tokenizer/load.h"

#include <limits>
#include <string>

#include "backprompt/error.h"

namespace backprompt {

namespace {

std::string key_error(const gguf::File& file, std::string_view key, const std::string& what) {
  return file.path() + ": " + std::string(key) + ": " + what;
}

// A special token id; absent, negative or UINT32_MAX (how converters write "none") give `fallback`.
int32_t read_id(const gguf::File& file, std::string_view key, int32_t fallback) {
  const std::optional<int64_t> v = file.get_int(key);
  if (!v) return fallback;
  if (*v < 0 || *v == std::numeric_limits<uint32_t>::max()) return -1;
  if (*v > std::numeric_limits<int32_t>::max()) {
    throw Error(ErrorCode::CORRUPT_FILE, key_error(file, key, "token id " + std::to_string(*v) + " is out of range"));
  }
  return static_cast<int32_t>(*v);
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const gguf::File& file) {
  TokenizerData data;

  const std::optional<std::string_view> model = file.get_string("tokenizer.ggml.model");
  if (!model) throw Error(ErrorCode::CORRUPT_FILE, key_error(file, "tokenizer.ggml.model", "missing"));
  if (*model == "gpt2") {
    data.kind = TokenizerKind::GPT2_BPE;
  } else if (*model == "llama") {
    data.kind = TokenizerKind::LLAMA_SPM;
  } else {
    throw Error(ErrorCode::UNSUPPORTED,
                key_error(file, "tokenizer.ggml.model", "tokenizer '" + std::string(*model) + "' is not supported"));
  }
  const bool spm = data.kind == TokenizerKind::LLAMA_SPM;

  data.pre = std::string(file.get_string("tokenizer.ggml.pre").value_or("default"));

  const auto tokens = file.get_string_array("tokenizer.ggml.tokens");
  if (!tokens) throw Error(ErrorCode::CORRUPT_FILE, key_error(file, "tokenizer.ggml.tokens", "missing"));
  data.tokens.assign(tokens->begin(), tokens->end());
  const size_t n_vocab = data.tokens.size();

  if (auto scores = file.get_float_array("tokenizer.ggml.scores")) data.scores = std::move(*scores);

  if (const auto types = file.get_int_array("tokenizer.ggml.token_type")) {
    data.token_types.reserve(types->size());
    for (size_t i = 0; i < types->size(); ++i) {
      const int64_t t = (*types)[i];
      if (t < 0 || t > 255) {
        throw Error(ErrorCode::CORRUPT_FILE, key_error(file, "tokenizer.ggml.token_type",
                                                       "element " + std::to_string(i) + " is " + std::to_string(t)));
      }
      data.token_types.push_back(static_cast<int32_t>(t));
    }
  }

  if (const auto merges = file.get_string_array("tokenizer.ggml.merges")) data.merges.assign(merges->begin(), merges->end());

  // SentencePiece vocabularies put <unk>, <s>, </s> first; llama.cpp assumes so when the keys are absent.
  data.unk_id = read_id(file, "tokenizer.ggml.unknown_token_id", spm && n_vocab > 0 ? 0 : -1);
  data.bos_id = read_id(file, "tokenizer.ggml.bos_token_id", spm && n_vocab > 1 ? 1 : -1);
  data.eos_id = read_id(file, "tokenizer.ggml.eos_token_id", spm && n_vocab > 2 ? 2 : -1);
  data.add_bos = file.get_bool("tokenizer.ggml.add_bos_token").value_or(spm);
  data.add_space_prefix = file.get_bool("tokenizer.ggml.add_space_prefix").value_or(true);

  try {
    return std::make_unique<Tokenizer>(std::move(data));
  } catch (const Error& e) {
    throw Error(e.code(), file.path() + ": " + e.what());
  }
}

}  // namespace backprompt
