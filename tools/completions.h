// What `score` and `graph` share: reading the prompt and completion files, and building the
// completion texts (prompt + choice [+ ending]) in a cache.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "backprompt/cache.h"

namespace backprompt::tools {

struct CompletionInputs {
  std::string model_path;
  std::string weights = "auto";  // WeightPlacement name
  std::string prompt;
  std::string prompt_file;
  std::string choices_file;
  std::string endings_file;
  uint64_t memory_budget = 2ull << 30;
  bool joined = false;  // tokenize the joined string instead of each segment
  std::string store;    // persistent K/V store URI ("" = none)
  std::string store_kv_type = "f32";
  bool store_zstd = false;
};

// Cache options from the shared command-line options. UsageError for a bad K/V type.
CacheOptions cache_options(const CompletionInputs& in);

// Declares -m, --weights, --prompt/--prompt-file, --choices, --endings, --budget, --joined on `cmd`.
void add_completion_options(CLI::App& cmd, CompletionInputs& in);

struct Completions {
  std::string prompt;
  std::vector<std::string> labels;  // [n] each completion as written (choice + ending)
  Text prompt_text;
  std::vector<Text> texts;          // [n] prompt + choice [+ ending]
};

// Reads the files (Error(IO_ERROR) naming an unreadable one; UsageError for an empty choices
// file) and builds the texts in `cache`. Nothing is computed.
Completions build_completions(const CompletionInputs& in, Cache& cache);

}  // namespace backprompt::tools
