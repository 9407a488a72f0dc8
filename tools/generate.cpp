// `backprompt generate -m MODEL -p PROMPT [-n N] [--temp T] [--top-k K] [--top-p P] [--seed S] [-t THREADS]`
//
// stdout gets the prompt exactly as given, then the bytes of each generated token as soon as it
// is chosen, and nothing else. Generation stops at EOS, after N tokens, or at the end of the
// context. BOS is prepended when the tokenizer asks for it (tokenizer.ggml.add_bos_token).
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "backprompt/model.h"
#include "commands.h"
#include "model/runtime.h"
#include "model/sampler.h"

namespace backprompt::tools {

namespace {

struct GenerateOptions {
  std::string model_path;
  std::string prompt;
  int32_t n_predict = 128;
  float temperature = 0.8f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 42;
  int32_t n_threads = 0;  // 0: OpenMP's default
  bool verbose = false;
};

void write_out(const std::string& bytes) {
  std::fwrite(bytes.data(), 1, bytes.size(), stdout);
  std::fflush(stdout);
}

int run_generate(const GenerateOptions& opt) {
  if (!std::isfinite(opt.temperature)) throw UsageError("--temp must be a finite number >= 0");
  if (!(opt.top_p > 0.0f)) throw UsageError("--top-p must be > 0");
  SamplingParams sp;
  sp.temperature = opt.temperature;
  sp.top_k = opt.top_k;
  sp.top_p = opt.top_p;
  sp.seed = opt.seed;
  Sampler sampler(sp);
  if (opt.n_threads > 0) omp_set_num_threads(opt.n_threads);

  const auto t_start = std::chrono::steady_clock::now();
  std::shared_ptr<Model> model = Model::load(opt.model_path);
  const Tokenizer& tok = model->tokenizer();
  const ModelConfig& cfg = model->config();

  EncodeOptions eo;
  eo.add_bos = tok.add_bos();
  std::vector<int32_t> tokens = tok.encode(opt.prompt, eo);  // [n_prompt]
  if (tokens.empty()) {
    if (tok.bos() < 0) {
      throw Error(ErrorCode::INVALID_ARGUMENT, "generate: the prompt is empty and the model has no BOS token to start from");
    }
    tokens.push_back(tok.bos());
  }
  if (static_cast<int64_t>(tokens.size()) > cfg.n_ctx) {
    throw Error(ErrorCode::INVALID_ARGUMENT, "generate: the prompt has " + std::to_string(tokens.size()) +
                                                 " tokens, more than the context length " + std::to_string(cfg.n_ctx));
  }

  write_out(opt.prompt);
  if (opt.n_predict <= 0) return 0;

  // SentencePiece prefixes the text with a space; with no prompt, the first generated piece
  // carries that space and it is dropped (as llama2.c and llama.cpp do).
  bool strip_space = opt.prompt.empty() && tok.kind() == TokenizerKind::LLAMA_SPM && tok.data().add_space_prefix;

  Sequence seq(*model);
  const auto t_eval = std::chrono::steady_clock::now();
  std::vector<float> logits = seq.append(tokens);  // [n_vocab]
  const auto t_prompt = std::chrono::steady_clock::now();
  int32_t n_generated = 0;
  const char* stop = "the token limit";
  while (true) {
    const int32_t next = sampler.sample(logits);
    if (next == tok.eos()) {
      stop = "EOS";
      break;
    }
    std::string piece = tok.token_to_piece(next);
    if (strip_space && !piece.empty()) {
      if (piece[0] == ' ') piece.erase(0, 1);
      strip_space = false;
    }
    write_out(piece);
    n_generated++;
    if (n_generated >= opt.n_predict) break;
    if (seq.n_tokens() >= cfg.n_ctx) {
      stop = "the end of the context";
      break;
    }
    logits = seq.append(std::span<const int32_t>(&next, 1));
  }

  if (opt.verbose) {
    using Seconds = std::chrono::duration<double>;
    const double load_s = Seconds(t_eval - t_start).count();
    const double prompt_s = Seconds(t_prompt - t_eval).count();
    const double gen_s = Seconds(std::chrono::steady_clock::now() - t_prompt).count();
    std::fprintf(stderr,
                 "\nbackprompt: %s (%s, %s): load %.2f s; prompt %zu tokens in %.3f s; %d tokens in %.3f s "
                 "(%.1f tokens/s); stopped at %s\n",
                 opt.model_path.c_str(), arch_name(cfg.arch), model->weight_type_name().c_str(), load_s,
                 tokens.size(), prompt_s, n_generated, gen_s, gen_s > 0 ? n_generated / gen_s : 0.0, stop);
  }
  return 0;
}

}  // namespace

CommandRun setup_generate(CLI::App& cmd) {
  auto opt = std::make_shared<GenerateOptions>();
  cmd.add_option("-m,--model", opt->model_path, "GGUF model file")->required();
  cmd.add_option("-p,--prompt", opt->prompt, "Prompt text (default: empty)");
  cmd.add_option("-n,--n-predict", opt->n_predict, "Tokens to generate at most")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--temp", opt->temperature, "Temperature; 0 is greedy (argmax)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--top-k", opt->top_k, "Sample among the K likeliest tokens; 0 is off")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--top-p", opt->top_p, "Nucleus sampling; 1 is off")->capture_default_str();
  cmd.add_option("--seed", opt->seed, "Seed of the sampler (llama2.c's xorshift)")->capture_default_str();
  cmd.add_option("-t,--threads", opt->n_threads, "Threads (default: all)")->check(CLI::PositiveNumber);
  cmd.add_flag("-v,--verbose", opt->verbose, "Print timings to stderr");
  return [opt]() { return run_generate(*opt); };
}

}  // namespace backprompt::tools
