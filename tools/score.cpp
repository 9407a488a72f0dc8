// `backprompt score -m MODEL (--prompt TEXT | --prompt-file FILE) --choices FILE [--endings FILE] [--json]`
//
// The classification use case: for each completion (a line of --choices, or with --endings every
// choice followed by every ending), the sum and mean log-probability of its tokens given the
// prompt, and its probability normalised over all completions (softmax of the sums). The prompt
// is computed once; all completions run in one ragged batch.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "commands.h"
#include "completions.h"

namespace backprompt::tools {

namespace {

struct ScoreOptions {
  CompletionInputs in;
  bool json = false;
  bool seams = false;
  int32_t n_threads = 0;
};

struct Score {
  size_t n_tokens = 0;
  double sum = 0.0, mean = 0.0, prob = 0.0;
};

int run_score(const ScoreOptions& opt) {
  if (opt.n_threads > 0) omp_set_num_threads(opt.n_threads);
  Cache cache(Model::load(opt.in.model_path, load_options(opt.in.weights)), cache_options(opt.in));
  Completions comp = build_completions(opt.in, cache);

  const size_t n_prompt = comp.prompt_text.tokens().size();
  for (size_t i = 0; i < comp.texts.size(); ++i) {
    const std::vector<int32_t> t = comp.texts[i].tokens();
    if (t.size() < n_prompt || !std::equal(t.begin(), t.begin() + static_cast<ptrdiff_t>(n_prompt), comp.prompt_text.tokens().begin()))
      throw Error(ErrorCode::INVALID_ARGUMENT, "score: completion " + std::to_string(i + 1) +
                                                   " changes the prompt's tokens (only possible with --joined); score it without --joined");
    if (t.size() == n_prompt)
      throw Error(ErrorCode::INVALID_ARGUMENT, "score: completion " + std::to_string(i + 1) + " ('" + comp.labels[i] + "') has no tokens");
    if (n_prompt == 0)
      throw Error(ErrorCode::INVALID_ARGUMENT, "score: the prompt has no tokens and the model adds no BOS: nothing predicts the first token");
  }
  if (opt.seams) {
    for (size_t i = 0; i < comp.texts.size(); ++i)
      for (const Seam& s : comp.texts[i].seam_report()) {
        auto ids = [](const std::vector<int32_t>& v) {
          std::string o;
          for (int32_t x : v) o += (o.empty() ? "" : " ") + std::to_string(x);
          return o;
        };
        std::fprintf(stderr, "seam: completion %zu, segment %zu (byte %zu): per-segment [%s] vs joined [%s]\n", i + 1, s.segment,
                     s.byte_offset, ids(s.segment_tokens).c_str(), ids(s.joined_tokens).c_str());
      }
  }

  // The prompt first (next-token logits only), then every completion in one batch.
  cache.eval(std::span<const Text>(&comp.prompt_text, 1));
  EvalOptions eo;
  eo.logprobs = true;
  eo.logprobs_from = n_prompt;
  cache.eval(comp.texts, eo);

  std::vector<Score> scores(comp.texts.size());
  double max_sum = -INFINITY;
  for (size_t i = 0; i < comp.texts.size(); ++i) {
    const std::vector<float> lp = comp.texts[i].logprobs(n_prompt);
    Score& s = scores[i];
    s.n_tokens = lp.size();
    for (float x : lp) s.sum += x;
    s.mean = s.sum / static_cast<double>(s.n_tokens);
    max_sum = std::max(max_sum, s.sum);
  }
  double z = 0.0;
  for (const Score& s : scores) z += std::exp(s.sum - max_sum);
  for (Score& s : scores) s.prob = std::exp(s.sum - max_sum) / z;

  cache.flush();
  const CacheStats st = cache.stats();
  if (opt.json) {
    nlohmann::ordered_json j;
    j["completions"] = nlohmann::ordered_json::array();
    for (size_t i = 0; i < scores.size(); ++i)
      j["completions"].push_back({{"text", comp.labels[i]}, {"n_tokens", scores[i].n_tokens}, {"sum_logprob", scores[i].sum},
                                  {"mean_logprob", scores[i].mean}, {"prob", scores[i].prob}});
    j["stats"] = {{"tokens_computed", st.tokens_computed}, {"tokens_reused", st.tokens_reused}, {"tokens_recomputed", st.tokens_recomputed}};
    if (!opt.in.store.empty()) j["stats"]["tokens_loaded"] = st.tokens_loaded;
    std::printf("%s\n", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  size_t width = 10;
  for (const std::string& l : comp.labels) width = std::max(width, std::min<size_t>(l.size() + 2, 48));
  std::printf("%-*s %8s %12s %12s %10s\n", static_cast<int>(width), "completion", "tokens", "sum_logprob", "mean_logprob", "prob");
  for (size_t i = 0; i < scores.size(); ++i) {
    std::string label = "\"" + comp.labels[i] + "\"";
    for (char& ch : label)
      if (ch == '\n' || ch == '\t') ch = ' ';
    if (label.size() > width) label = label.substr(0, width - 3) + "...";
    std::printf("%-*s %8zu %12.4f %12.4f %10.4f\n", static_cast<int>(width), label.c_str(), scores[i].n_tokens, scores[i].sum,
                scores[i].mean, scores[i].prob);
  }
  std::fprintf(stderr, "tokens computed: %llu, reused from cache: %llu, loaded from store: %llu\n",
               static_cast<unsigned long long>(st.tokens_computed), static_cast<unsigned long long>(st.tokens_reused),
               static_cast<unsigned long long>(st.tokens_loaded));
  return 0;
}

}  // namespace

CommandRun setup_score(CLI::App& cmd) {
  auto opt = std::make_shared<ScoreOptions>();
  add_completion_options(cmd, opt->in);
  cmd.add_flag("--json", opt->json, "Print one JSON object instead of a table");
  cmd.add_flag("--seams", opt->seams, "List (on stderr) where tokenizing pieces separately differs from the joined text");
  cmd.add_option("-t,--threads", opt->n_threads, "Threads (default: all)")->check(CLI::PositiveNumber);
  return [opt]() { return run_score(*opt); };
}

}  // namespace backprompt::tools
