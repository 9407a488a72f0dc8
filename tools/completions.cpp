#include "completions.h"

#include <fstream>
#include <sstream>

#include "backprompt/error.h"
#include "commands.h"

namespace backprompt::tools {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(ErrorCode::IO_ERROR, "cannot open '" + path + "'");
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// One completion per line, as written (a leading space is kept); a final newline ends the last line.
std::vector<std::string> read_lines(const std::string& path) {
  const std::string s = read_file(path);
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find('\n', start);
    if (end == std::string::npos) end = s.size();
    std::string line = s.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
    start = end + 1;
  }
  return lines;
}

}  // namespace

void add_completion_options(CLI::App& cmd, CompletionInputs& in) {
  cmd.add_option("-m,--model", in.model_path, "GGUF model file")->required();
  add_weights_option(cmd, &in.weights);
  auto* p = cmd.add_option("--prompt", in.prompt, "The prompt (context) text");
  auto* pf = cmd.add_option("--prompt-file", in.prompt_file, "File holding the prompt text (used as is)");
  p->excludes(pf);
  cmd.add_option("--choices", in.choices_file, "File with one completion per line")->required();
  cmd.add_option("--endings", in.endings_file, "File with one ending per line: every choice is followed by every ending");
  cmd.add_option("--budget", in.memory_budget, "Memory budget of the K/V cache in bytes")->capture_default_str();
  cmd.add_option("--store", in.store, "Persistent K/V store: dir:PATH[?max_bytes=N] or redis://HOST:PORT[/DB]");
  cmd.add_option("--store-kv-type", in.store_kv_type, "K/V type at rest in the store: f32 (exact), f16, bf16, q8_0")->capture_default_str();
  cmd.add_flag("--store-zstd", in.store_zstd, "Compress stored K/V with zstd");
  cmd.add_flag("--joined", in.joined, "Tokenize each whole text instead of each piece (cache reuse then follows token prefixes)");
}

CacheOptions cache_options(const CompletionInputs& in) {
  CacheOptions co;
  co.memory_budget = in.memory_budget;
  co.policy = in.joined ? TokenizePolicy::JOINED : TokenizePolicy::PER_SEGMENT;
  co.store = in.store;
  std::optional<KvType> t = kv_type_from_name(in.store_kv_type);
  if (!t) throw UsageError("--store-kv-type must be f32, f16, bf16 or q8_0, not '" + in.store_kv_type + "'");
  co.store_kv_type = *t;
  co.store_zstd = in.store_zstd;
  return co;
}

Completions build_completions(const CompletionInputs& in, Cache& cache) {
  Completions out;
  out.prompt = in.prompt_file.empty() ? in.prompt : read_file(in.prompt_file);
  const std::vector<std::string> choices = read_lines(in.choices_file);
  if (choices.empty()) throw UsageError("the choices file '" + in.choices_file + "' has no lines");
  std::vector<std::string> endings;
  if (!in.endings_file.empty()) {
    endings = read_lines(in.endings_file);
    if (endings.empty()) throw UsageError("the endings file '" + in.endings_file + "' has no lines");
  }
  // Each piece is one Text, shared by every completion that uses it.
  out.prompt_text = cache.text(out.prompt);
  std::vector<Text> ending_texts;
  for (const std::string& e : endings) ending_texts.push_back(cache.text(e));
  for (const std::string& c : choices) {
    const Text tc = out.prompt_text + cache.text(c);
    if (endings.empty()) {
      out.labels.push_back(c);
      out.texts.push_back(tc);
      continue;
    }
    for (size_t j = 0; j < endings.size(); ++j) {
      out.labels.push_back(c + endings[j]);
      out.texts.push_back(tc + ending_texts[j]);
    }
  }
  return out;
}

}  // namespace backprompt::tools
