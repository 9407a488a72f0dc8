// Pre-tokenizer regexes, matched with PCRE2 in UTF + UCP mode (JIT-compiled when available).
#include "tokenizer/pretokenize.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <memory>
#include <string>

#include "backprompt/error.h"

namespace backprompt {

namespace {

// Written as in the original tokenizer definitions (OpenAI's encoder.py, Meta's tokenizer.json).
constexpr const char* GPT2_PATTERN =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr const char* LLAMA3_PATTERN =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct MatchDataDeleter {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context* mc) const { pcre2_match_context_free(mc); }
};
struct JitStackDeleter {
  void operator()(pcre2_jit_stack* js) const { pcre2_jit_stack_free(js); }
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  if (pcre2_get_error_message(code, buf, sizeof(buf)) < 0) return "PCRE2 error " + std::to_string(code);
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

std::optional<PreTokenizerKind> pre_tokenizer_from_name(std::string_view name) {
  if (name == "gpt-2" || name == "gpt2" || name == "default") return PreTokenizerKind::GPT2;
  if (name == "llama-bpe" || name == "llama3" || name == "llama-v3") return PreTokenizerKind::LLAMA3;
  return std::nullopt;
}

const char* pre_tokenizer_name(PreTokenizerKind kind) {
  switch (kind) {
    case PreTokenizerKind::GPT2: return "gpt-2";
    case PreTokenizerKind::LLAMA3: return "llama-bpe";
  }
  return "?";
}

PreTokenizer::PreTokenizer(PreTokenizerKind kind) : kind_(kind) {
  const char* pattern = kind == PreTokenizerKind::GPT2 ? GPT2_PATTERN : LLAMA3_PATTERN;
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  // MATCH_INVALID_UTF: invalid UTF-8 in a text is never matched (and never an error).
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &error_offset, nullptr);
  // The patterns are constants: failing to compile them is a bug, not bad input.
  BP_ASSERT(code_ != nullptr);
  jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
}

PreTokenizer::~PreTokenizer() { pcre2_code_free(code_); }

void PreTokenizer::split(std::string_view text, std::vector<std::string_view>& words) const {
  if (text.empty()) return;
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(pcre2_match_data_create_from_pattern(code_, nullptr));
  if (!md) throw Error(ErrorCode::OUT_OF_MEMORY, "pre-tokenizer: cannot allocate PCRE2 match data");
  // The JIT runs on a 32 KiB stack by default; only a pathological text needs more, and only
  // then is a larger one made (per call: nothing is shared between threads).
  std::unique_ptr<pcre2_match_context, MatchContextDeleter> mc;
  std::unique_ptr<pcre2_jit_stack, JitStackDeleter> jit_stack;

  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  const size_t n = text.size();
  size_t pos = 0;
  while (pos < n) {
    int rc = pcre2_match(code_, subject, n, pos, 0, md.get(), mc.get());
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !jit_stack) {
      mc.reset(pcre2_match_context_create(nullptr));
      jit_stack.reset(pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr));
      if (!mc || !jit_stack) throw Error(ErrorCode::OUT_OF_MEMORY, "pre-tokenizer: cannot allocate a PCRE2 JIT stack");
      pcre2_jit_stack_assign(mc.get(), nullptr, jit_stack.get());
      rc = pcre2_match(code_, subject, n, pos, 0, md.get(), mc.get());
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      throw Error(ErrorCode::INVALID_ARGUMENT,
                  "pre-tokenizer: regex match failed at byte " + std::to_string(pos) + ": " + pcre2_message(rc));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    const size_t begin = ov[0], end = ov[1];
    BP_ASSERT(begin >= pos && end >= begin && end <= n);
    if (begin > pos) words.push_back(text.substr(pos, begin - pos));  // unmatched (invalid UTF-8) bytes
    if (end == begin) {
      // Cannot happen with these patterns (every branch consumes a character); never loop forever.
      words.push_back(text.substr(begin, 1));
      pos = begin + 1;
      continue;
    }
    words.push_back(text.substr(begin, end - begin));
    pos = end;
  }
  if (pos < n) words.push_back(text.substr(pos));
}

}  // namespace backprompt
