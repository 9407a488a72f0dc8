// `backprompt bench -m MODEL [-p 512] [-n 128] [-t THREADS] [-r REPS]`: prefill and decode speed.
//
// The model is loaded once; load time is not part of any figure. Each test runs once to warm up
// (page in the mmap'd weights, touch the K/V pages of the one Sequence every run reuses, grow the
// allocator's pools), then REPS times; the lines report the mean and the sample standard
// deviation of tokens per second over those runs:
//   ppP: one Sequence::append of P random tokens, logits of the last one only (LogitsMode::LAST);
//   tgN: after a P-token prompt (not timed), N tokens decoded one at a time, each the argmax of
//        the previous logits; only the N decode steps are timed.
// Tokens are drawn from a fixed seed, so every run and every model sees the same ones.
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "backprompt/model.h"
#include "commands.h"
#include "model/runtime.h"
#include "model/sampler.h"
#include "tensor/kernels.h"

namespace backprompt::tools {

namespace {

struct BenchOptions {
  std::string model_path;
  int32_t n_prompt = 512;
  int32_t n_gen = 128;
  int32_t n_threads = 0;  // 0: every core
  int32_t n_reps = 3;
  std::string weights = "auto";  // WeightPlacement name
};

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int32_t> random_tokens(int32_t n, int32_t n_vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> pick(0, n_vocab - 1);
  std::vector<int32_t> out(static_cast<size_t>(n));  // [n]
  for (int32_t& t : out) t = pick(rng);
  return out;
}

// Seconds to prefill `prompt` into `seq`, emptied first. Its K/V memory is kept from one run to
// the next (Sequence::clear), as llama-bench keeps its context's: the warm-up run pays the
// first-touch page faults of fresh K/V pages, the timed runs do not.
double time_prefill(Sequence& seq, const std::vector<int32_t>& prompt) {
  seq.clear();
  const Clock::time_point t0 = Clock::now();
  seq.append(prompt, LogitsMode::LAST);
  return seconds_since(t0);
}

// Seconds to decode n_gen tokens one at a time after `prompt` (the prompt itself is not timed),
// in `seq`, emptied first.
double time_decode(Sequence& seq, const std::vector<int32_t>& prompt, int32_t n_gen) {
  seq.clear();
  std::vector<float> logits = seq.append(prompt, LogitsMode::LAST);  // [n_vocab]
  int32_t next = prompt.empty() ? 0 : argmax(logits);
  const Clock::time_point t0 = Clock::now();
  for (int32_t i = 0; i < n_gen; ++i) {
    logits = seq.append(std::span<const int32_t>(&next, 1), LogitsMode::LAST);
    next = argmax(logits);
  }
  return seconds_since(t0);
}

struct Rate {
  double mean = 0, stddev = 0;  // tokens per second
};

// One warm-up run, then n_reps timed runs of `run` (which returns seconds for n_tokens tokens).
template <typename F>
Rate measure(int32_t n_reps, int32_t n_tokens, F run) {
  run();
  std::vector<double> rates;  // [n_reps] tokens per second
  for (int32_t r = 0; r < n_reps; ++r) rates.push_back(n_tokens / std::max(run(), 1e-9));
  Rate out;
  for (double x : rates) out.mean += x;
  out.mean /= static_cast<double>(rates.size());
  if (rates.size() > 1) {
    double ss = 0;
    for (double x : rates) ss += (x - out.mean) * (x - out.mean);
    out.stddev = std::sqrt(ss / static_cast<double>(rates.size() - 1));
  }
  return out;
}

int run_bench(const BenchOptions& opt) {
  if (opt.n_prompt == 0 && opt.n_gen == 0) throw UsageError("nothing to measure: -p and -n are both 0");
  const int32_t n_threads = opt.n_threads > 0 ? opt.n_threads : omp_get_num_procs();
  omp_set_num_threads(n_threads);

  const Clock::time_point t_load = Clock::now();
  std::shared_ptr<Model> model = Model::load(opt.model_path, load_options(opt.weights));
  const double load_s = seconds_since(t_load);
  const ModelConfig& cfg = model->config();
  if (static_cast<int64_t>(opt.n_prompt) + opt.n_gen > cfg.n_ctx) {
    throw Error(ErrorCode::INVALID_ARGUMENT, "bench: -p " + std::to_string(opt.n_prompt) + " plus -n " +
                                                 std::to_string(opt.n_gen) + " tokens exceed the context length " +
                                                 std::to_string(cfg.n_ctx) + " of " + opt.model_path);
  }
  std::printf("model: %s (%s, %.2fM params, %s)\n", opt.model_path.c_str(), arch_name(cfg.arch),
              static_cast<double>(model->n_params()) / 1e6, model->weight_type_name().c_str());
  std::printf("weights: %s\n", model->weight_placement() == WeightPlacement::MEMORY
                                   ? "in memory (read at load, transparent huge pages asked for)"
                                   : "mapped from the file");
  std::printf("threads: %d\n", n_threads);
  const bool bf16 = kernels_matmul_precision() == MatmulPrecision::BF16 && kernels_bf16_native();
  const bool int8 = kernels_decode_precision() == DecodePrecision::INT8 && kernels_int8_native();
  std::printf("arithmetic: prefill %s, decode %s (%s kernels)\n",
              bf16 ? "bf16 (BACKPROMPT_MATMUL=bf16, not exact)" : "exact",
              int8 ? "int8 activations for q8_0 weights (BACKPROMPT_DECODE=int8, not exact)" : "exact", kernels_isa());
  double load[1] = {0};
  if (getloadavg(load, 1) == 1) {  // other work on the machine makes every figure below noisy
    std::printf("load average: %.2f on %d cores before the run\n", load[0], omp_get_num_procs());
  }
  std::printf("model load: %.3f s (not in the figures below)\n", load_s);
  std::fflush(stdout);

  const std::vector<int32_t> prompt = random_tokens(opt.n_prompt, cfg.n_vocab, 1234);  // [n_prompt]
  Sequence seq(*model);
  if (opt.n_prompt > 0) {
    const Rate r = measure(opt.n_reps, opt.n_prompt, [&] { return time_prefill(seq, prompt); });
    std::printf("pp%d: %.2f ± %.2f tok/s\n", opt.n_prompt, r.mean, r.stddev);
    std::fflush(stdout);
  }
  if (opt.n_gen > 0) {
    const Rate r = measure(opt.n_reps, opt.n_gen, [&] { return time_decode(seq, prompt, opt.n_gen); });
    std::printf("tg%d: %.2f ± %.2f tok/s\n", opt.n_gen, r.mean, r.stddev);
  }
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("peak RSS: %.1f MiB\n", static_cast<double>(ru.ru_maxrss) / 1024.0);  // ru_maxrss is in KiB
  if (const size_t packed = matmul_packed_bytes(); packed > 0) {
    std::printf("bf16 packed weights: %.1f MiB (in the peak RSS)\n", static_cast<double>(packed) / (1 << 20));
  }
  return 0;
}

}  // namespace

CommandRun setup_bench(CLI::App& cmd) {
  auto opt = std::make_shared<BenchOptions>();
  cmd.add_option("-m,--model", opt->model_path, "GGUF model file")->required();
  cmd.add_option("-p,--n-prompt", opt->n_prompt, "Prompt tokens prefilled in one call (0: skip)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("-n,--n-gen", opt->n_gen, "Tokens decoded one at a time after the prompt (0: skip)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("-t,--threads", opt->n_threads, "Threads (default: all cores)")->check(CLI::Range(1, 4096));
  cmd.add_option("-r,--reps", opt->n_reps, "Timed runs per test, after one warm-up run")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  add_weights_option(cmd, &opt->weights);
  return [opt]() { return run_bench(*opt); };
}

}  // namespace backprompt::tools
