// `backprompt tokenize -m MODEL (-p TEXT | -f FILE) [--bos]`: one line of space-separated ids.
//
// Only the tokenizer metadata is read, so vocabulary-only GGUF files work too.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>

#include "backprompt/error.h"
#include "commands.h"
#include "gguf/gguf.h"
#include "tokenizer/load.h"

namespace backprompt::tools {

namespace {

struct TokenizeOptions {
  std::string model_path;
  std::string prompt;
  std::string file;
  bool bos = false;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorCode::IO_ERROR, path + ": cannot open for reading");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(ErrorCode::IO_ERROR, path + ": read failed");
  return text;
}

}  // namespace

CommandRun setup_tokenize(CLI::App& cmd) {
  auto opt = std::make_shared<TokenizeOptions>();
  cmd.add_option("-m,--model", opt->model_path, "GGUF file with tokenizer metadata (a model or a vocabulary)")
      ->required();
  CLI::Option* prompt = cmd.add_option("-p,--prompt", opt->prompt, "Text to tokenize");
  CLI::Option* file = cmd.add_option("-f,--file", opt->file, "File whose bytes are tokenized");
  prompt->excludes(file);
  cmd.add_flag("--bos", opt->bos, "Prepend the BOS token");

  return [opt, prompt, file]() {
    if (prompt->count() == 0 && file->count() == 0) throw UsageError("one of -p/--prompt or -f/--file is required");
    const std::string text = file->count() > 0 ? read_file(opt->file) : opt->prompt;
    std::unique_ptr<gguf::File> gguf = gguf::File::open(opt->model_path);
    std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(*gguf);
    EncodeOptions eo;
    eo.add_bos = opt->bos;
    std::string line;
    for (int32_t id : tokenizer->encode(text, eo)) {
      if (!line.empty()) line += ' ';
      line += std::to_string(id);
    }
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stdout);
    return 0;
  };
}

}  // namespace backprompt::tools
