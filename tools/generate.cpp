// `backprompt generate -m MODEL -p PROMPT [-n N] [--temp T] [--top-k K] [--top-p P] [--seed S] [-t THREADS]`
//                      [--cache-prompt FILE [--kv-type T] [--zstd] | --restore-prompt FILE]
//
// stdout gets the prompt exactly as given, then the bytes of each generated token as soon as it
// is chosen, and nothing else. Generation stops at EOS, after N tokens, or at the end of the
// context. BOS is prepended when the tokenizer asks for it (tokenizer.ggml.add_bos_token).
//
// --cache-prompt FILE evaluates the prompt, writes its snapshot (with the sampler settings) and
// generates nothing. --restore-prompt FILE loads one and appends -p right after it: stdout is that
// -p text, then the generated text, and the generated tokens equal those of one run on the whole
// prompt. The snapshot's sampler settings and random stream are used unless given here (--seed
// restarts the stream).
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "backprompt/model.h"
#include "backprompt/snapshot.h"
#include "commands.h"
#include "model/sampler.h"

namespace backprompt::tools {

namespace {

struct GenerateOptions {
  std::string model_path;
  std::string weights = "auto";  // WeightPlacement name
  std::string store;  // persistent K/V store URI
  std::string prompt;
  int32_t n_predict = 128;
  float temperature = 0.8f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 42;
  int32_t n_threads = 0;  // 0: OpenMP's default
  bool verbose = false;
  std::string cache_prompt;    // snapshot to write
  std::string restore_prompt;  // snapshot to continue
  std::string kv_type = "f32";
  bool zstd = false;
  // Which sampler options the command line set (the others come from a restored snapshot).
  bool temp_given = false, top_k_given = false, top_p_given = false, seed_given = false;
};

void write_out(const std::string& bytes) {
  std::fwrite(bytes.data(), 1, bytes.size(), stdout);
  std::fflush(stdout);
}

int run_generate(const GenerateOptions& opt) {
  if (!std::isfinite(opt.temperature)) throw UsageError("--temp must be a finite number >= 0");
  if (!(opt.top_p > 0.0f)) throw UsageError("--top-p must be > 0");
  if (!opt.cache_prompt.empty() && !opt.restore_prompt.empty())
    throw UsageError("--cache-prompt and --restore-prompt cannot be used together");
  const std::optional<KvType> kv_type = kv_type_from_name(opt.kv_type);
  if (!kv_type) throw UsageError("--kv-type must be f32, f16, bf16 or q8_0, not '" + opt.kv_type + "'");
  if (opt.cache_prompt.empty() && (opt.kv_type != "f32" || opt.zstd))
    throw UsageError("--kv-type and --zstd apply to --cache-prompt only");
  SamplingParams sp;
  sp.temperature = opt.temperature;
  sp.top_k = opt.top_k;
  sp.top_p = opt.top_p;
  sp.seed = opt.seed;
  if (opt.n_threads > 0) omp_set_num_threads(opt.n_threads);

  const auto t_start = std::chrono::steady_clock::now();
  std::shared_ptr<Model> model = Model::load(opt.model_path, load_options(opt.weights));
  const Tokenizer& tok = model->tokenizer();
  const ModelConfig& cfg = model->config();
  CacheOptions co;
  co.store = opt.store;
  Cache cache(model, co);

  // The text to continue: the prompt, or the restored snapshot followed by the prompt.
  Text text;
  bool starts_empty = opt.prompt.empty();  // nothing before the first generated token
  if (!opt.restore_prompt.empty()) {
    SamplingParams saved;
    const Text restored = cache.restore(opt.restore_prompt, &saved);
    text = opt.prompt.empty() ? restored : restored + opt.prompt;
    starts_empty = starts_empty && restored.string().empty();
    if (!opt.temp_given) sp.temperature = saved.temperature;
    if (!opt.top_k_given) sp.top_k = saved.top_k;
    if (!opt.top_p_given) sp.top_p = saved.top_p;
    if (!opt.seed_given) {
      sp.seed = saved.seed;
      sp.rng_state = saved.rng_state;
    }
  } else {
    text = cache.text(opt.prompt);
  }
  size_t n_prompt = text.n_tokens();
  if (n_prompt == 0) {
    if (tok.bos() < 0) {
      throw Error(ErrorCode::INVALID_ARGUMENT, "generate: the prompt is empty and the model has no BOS token to start from");
    }
    text = cache.tokens({tok.bos()});
    n_prompt = 1;
  }
  if (static_cast<int64_t>(n_prompt) > cfg.n_ctx) {
    throw Error(ErrorCode::INVALID_ARGUMENT, "generate: the prompt has " + std::to_string(n_prompt) +
                                                 " tokens, more than the context length " + std::to_string(cfg.n_ctx));
  }

  if (!opt.cache_prompt.empty()) {
    SnapshotOptions so;
    so.kv_type = *kv_type;
    so.zstd = opt.zstd;
    so.sampler = sp;
    text.save(opt.cache_prompt, so);
    write_out(opt.prompt);
    if (opt.verbose) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      std::fprintf(stderr, "\nbackprompt: %s: prompt of %zu tokens saved to %s (K/V %s%s) in %.2f s\n",
                   opt.model_path.c_str(), n_prompt, opt.cache_prompt.c_str(), opt.kv_type.c_str(),
                   opt.zstd ? " + zstd" : "", s);
    }
    return 0;
  }

  write_out(opt.prompt);
  if (opt.n_predict <= 0) return 0;

  // SentencePiece prefixes the text with a space; with no prompt, the first generated piece
  // carries that space and it is dropped (as llama2.c and llama.cpp do).
  bool strip_space = starts_empty && tok.kind() == TokenizerKind::LLAMA_SPM && tok.data().add_space_prefix;

  const auto t_eval = std::chrono::steady_clock::now();
  text.next_logits();  // the prompt's missing K/V (none after a restore without more text)
  const auto t_prompt = std::chrono::steady_clock::now();
  int32_t n_generated = 0;
  bool hit_eos = false;
  auto emit = [&](int32_t token) {
    if (token == tok.eos()) {
      hit_eos = true;
      return false;
    }
    std::string piece = tok.token_to_piece(token);
    if (strip_space && !piece.empty()) {
      if (piece[0] == ' ') piece.erase(0, 1);
      strip_space = false;
    }
    write_out(piece);
    return ++n_generated < opt.n_predict;
  };
  // Text::generate computes the K/V of every token it returns, so it stops one position before
  // the end of the context; the last token there is sampled from the final logits.
  const int32_t room = cfg.n_ctx - static_cast<int32_t>(n_prompt);
  uint64_t rng_state = sp.rng_state;  // stays as is if generate() has no room at all
  const Text out = text.generate(std::min(opt.n_predict, room), sp, emit, &rng_state);
  const char* stop = hit_eos ? "EOS" : "the token limit";
  if (!hit_eos && n_generated < opt.n_predict && n_generated == room) {
    SamplingParams last = sp;
    last.rng_state = rng_state;
    Sampler sampler(last);
    emit(sampler.sample(out.next_logits()));
    if (!hit_eos) stop = "the end of the context";
  }

  if (opt.verbose) {
    using Seconds = std::chrono::duration<double>;
    const double load_s = Seconds(t_eval - t_start).count();
    const double prompt_s = Seconds(t_prompt - t_eval).count();
    const double gen_s = Seconds(std::chrono::steady_clock::now() - t_prompt).count();
    const CacheStats st = cache.stats();
    std::fprintf(stderr,
                 "\nbackprompt: %s (%s, %s): load %.2f s; prompt %zu tokens (%llu computed) in %.3f s; %d tokens in "
                 "%.3f s (%.1f tokens/s); stopped at %s\n",
                 opt.model_path.c_str(), arch_name(cfg.arch), model->weight_type_name().c_str(), load_s, n_prompt,
                 static_cast<unsigned long long>(st.tokens_computed - static_cast<uint64_t>(n_generated)), prompt_s,
                 n_generated, gen_s, gen_s > 0 ? n_generated / gen_s : 0.0, stop);
  }
  return 0;
}

}  // namespace

CommandRun setup_generate(CLI::App& cmd) {
  auto opt = std::make_shared<GenerateOptions>();
  cmd.add_option("-m,--model", opt->model_path, "GGUF model file")->required();
  add_weights_option(cmd, &opt->weights);
  cmd.add_option("-p,--prompt", opt->prompt, "Prompt text (default: empty); with --restore-prompt, the text appended to the snapshot's");
  cmd.add_option("-n,--n-predict", opt->n_predict, "Tokens to generate at most")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  CLI::Option* temp = cmd.add_option("--temp", opt->temperature, "Temperature; 0 is greedy (argmax)")
                          ->capture_default_str()
                          ->check(CLI::NonNegativeNumber);
  CLI::Option* top_k = cmd.add_option("--top-k", opt->top_k, "Sample among the K likeliest tokens; 0 is off")
                           ->capture_default_str()
                           ->check(CLI::NonNegativeNumber);
  CLI::Option* top_p = cmd.add_option("--top-p", opt->top_p, "Nucleus sampling; 1 is off")->capture_default_str();
  CLI::Option* seed = cmd.add_option("--seed", opt->seed, "Seed of the sampler (llama2.c's xorshift)")->capture_default_str();
  cmd.add_option("-t,--threads", opt->n_threads, "Threads (default: all)")->check(CLI::PositiveNumber);
  cmd.add_flag("-v,--verbose", opt->verbose, "Print timings to stderr");
  cmd.add_option("--store", opt->store, "Persistent K/V store (dir:PATH or redis://HOST:PORT[/DB]): the prompt's K/V are loaded from it when there, written to it when computed");
  cmd.add_option("--cache-prompt", opt->cache_prompt,
                 "Evaluate the prompt, save its snapshot (K/V, logits, sampler settings) to FILE, generate nothing");
  cmd.add_option("--restore-prompt", opt->restore_prompt,
                 "Continue the snapshot in FILE: -p is appended to it; its sampler settings and random stream are "
                 "used unless given here");
  cmd.add_option("--kv-type", opt->kv_type, "K/V type in the --cache-prompt snapshot: f32 (exact), f16, bf16, q8_0")
      ->capture_default_str();
  cmd.add_flag("--zstd", opt->zstd, "Compress the --cache-prompt snapshot's K/V with zstd");
  return [opt, temp, top_k, top_p, seed]() {
    opt->temp_given = temp->count() > 0;
    opt->top_k_given = top_k->count() > 0;
    opt->top_p_given = top_p->count() > 0;
    opt->seed_given = seed->count() > 0;
    return run_generate(*opt);
  };
}

}  // namespace backprompt::tools
