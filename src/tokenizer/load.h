#pragma once

#include <memory>

#include "backprompt/tokenizer.h"
#include "gguf/gguf.h"

namespace backprompt {

// Reads tokenizer.ggml.* from a GGUF file. Error(CORRUPT_FILE) naming the key if something is
// missing or inconsistent; Error(UNSUPPORTED) for an unknown tokenizer.ggml.model or .pre.
std::unique_ptr<Tokenizer> load_tokenizer(const gguf::File& file);

}  // namespace backprompt
