// bench_cache MODEL [--quick] [--sample N] [--only W] [--reps N] [-t THREADS]: the cache on three
// prompt workloads (see bench/README.md; bench/run.sh runs it on llama-110m f32).
//
// Every workload is a set of texts built by concatenating string pieces (random words from a
// seeded list, so every run builds the same texts) that share prefixes the way real prompt sets
// do. Every text is scored in full: log p(token_i | tokens before it) for every token.
//   W1: a 500-token context x 8 choices x 8 endings (64 texts: context + choice + ending).
//   W2: a 1000-token prompt followed by each of 50 completions of 1-5 tokens.
//   W3: 100 few-shot prompts: a shared 300-token instruction, 3 examples drawn in random order
//       from a pool of 10 (30-40 tokens each), then a question of its own (10-20 tokens).
//
// For each workload:
//   cached        a fresh Cache, the texts built as a user would, one cache.eval(texts,
//                 {.logprobs = true}), then every text's logprobs() read back. Wall time.
//   from scratch  every text alone: a fresh Sequence, one append(all its tokens, ALL), logprobs
//                 from the logits. Long, so only --sample texts (evenly spaced) are run and the
//                 total is extrapolated (mean time per text x number of texts); labelled so.
//   unique        the number of distinct token-path prefixes over all texts (the nodes of a trie
//                 of every text's tokens): the least work any exact cache can do.
//   runtime alone Sequences over `unique` tokens laid end to end (see time_runtime).
//   ratio         cached / runtime alone. Goal: <= 1.2.
//   spans         the very rows the cache computes, at their positions, through forward() alone
//                 (see time_spans); cached / spans is the cache's own overhead.
// It also checks that cached and from-scratch logprobs agree on the sampled texts.
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
#include <unordered_map>
#include <vector>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "backprompt/model.h"
#include "backprompt/text.h"
#include "model/runtime.h"

namespace bp = backprompt;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// CPU seconds of this process, all threads: less disturbed than wall time by other processes on a
// shared machine (but it counts OpenMP threads spinning at barriers).
double cpu_seconds() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// ---------------------------------------------------------------------------------------------
// Texts from random words

const char* const WORDS[] = {
    "the",     "a",      "small",   "house",   "river",  "morning", "light",   "stone",   "garden",  "window",
    "old",     "green",  "quiet",   "road",    "winter", "summer",  "friend",  "letter",  "market",  "city",
    "north",   "south",  "bright",  "dark",    "cold",   "warm",    "table",   "chair",   "book",    "story",
    "king",    "queen",  "horse",   "bird",    "forest", "mountain", "sea",    "ship",    "island",  "bridge",
    "walked",  "found",  "gave",    "took",    "saw",    "heard",   "said",    "made",    "came",    "went",
    "and",     "but",    "then",    "when",    "after",  "before",  "under",   "over",    "near",    "far",
    "red",     "blue",   "white",   "black",   "long",   "short",   "high",    "low",     "new",     "young",
    "water",   "fire",   "wind",    "rain",    "snow",   "sun",     "moon",    "star",    "sky",     "cloud",
    "child",   "mother", "father",  "teacher", "doctor", "farmer",  "soldier", "artist",  "writer",  "singer",
    "slowly",  "quickly", "often",  "never",   "always", "again",   "together", "alone",  "almost",  "perhaps",
    "question", "answer", "reason", "number",  "problem", "system", "example", "result",  "change",  "record",
    "happy",   "sad",    "strange", "simple",  "careful", "gentle", "famous",  "hidden",  "empty",   "heavy",
    "bread",   "apple",  "coffee",  "music",   "paper",  "glass",   "silver",  "golden",  "wooden",  "iron",
};
constexpr size_t N_WORDS = sizeof(WORDS) / sizeof(WORDS[0]);

// Makes pieces of about a given number of tokens. A word's cost is its token count with a
// leading space, under the model's tokenizer (byte vocabularies: a token per byte).
class Words {
 public:
  Words(const bp::Tokenizer& tok, uint64_t seed) : rng_(seed) {
    bp::EncodeOptions eo;
    eo.add_space_prefix = false;
    for (const char* w : WORDS) cost_.push_back(std::max<size_t>(1, tok.encode(std::string(" ") + w, eo).size()));
  }

  // Words adding up to n_tokens (stopping early rather than going over, unless that would leave
  // the piece empty). `leading_space`: the piece continues a text (pieces after the first).
  std::string piece(int32_t n_tokens, bool leading_space = true) {
    std::string s;
    int32_t used = 0;
    while (used < n_tokens) {
      const size_t w = pick(rng_);
      if (used > 0 && used + static_cast<int32_t>(cost_[w]) > n_tokens) {
        if (++misses_ < 8) continue;
        break;
      }
      misses_ = 0;
      if (!s.empty() || leading_space) s += ' ';
      s += WORDS[w];
      used += static_cast<int32_t>(cost_[w]);
    }
    misses_ = 0;
    return s;
  }
  int32_t uniform(int32_t lo, int32_t hi) { return std::uniform_int_distribution<int32_t>(lo, hi)(rng_); }
  std::mt19937_64& rng() { return rng_; }

 private:
  std::mt19937_64 rng_;
  std::uniform_int_distribution<size_t> pick{0, N_WORDS - 1};
  std::vector<size_t> cost_;  // [N_WORDS] tokens of " word"
  int misses_ = 0;
};

// A workload: texts, each a list of string segments.
struct Workload {
  std::string name, what;
  std::vector<std::vector<std::string>> texts;  // [n_texts][n_segments]
};

struct Sizes {
  int32_t w1_context, w1_choices, w1_endings;
  int32_t w2_prompt, w2_completions;
  int32_t w3_prompts, w3_instruction, w3_pool, w3_example_lo, w3_example_hi, w3_question_lo, w3_question_hi;
};

constexpr Sizes FULL = {500, 8, 8, 1000, 50, 100, 300, 10, 30, 40, 10, 20};
constexpr Sizes QUICK = {100, 4, 4, 200, 10, 20, 60, 10, 8, 12, 4, 8};

std::vector<Workload> make_workloads(const bp::Tokenizer& tok, const Sizes& z) {
  std::vector<Workload> out;
  {
    Words w(tok, 1);
    Workload wl{"W1", std::to_string(z.w1_context) + "-token context x " + std::to_string(z.w1_choices) + " choices x " +
                          std::to_string(z.w1_endings) + " endings", {}};
    const std::string context = w.piece(z.w1_context, false);
    std::vector<std::string> choices, endings;
    for (int32_t i = 0; i < z.w1_choices; ++i) choices.push_back(w.piece(w.uniform(2, 4)));
    for (int32_t i = 0; i < z.w1_endings; ++i) endings.push_back(w.piece(w.uniform(3, 6)));
    for (const std::string& c : choices)
      for (const std::string& e : endings) wl.texts.push_back({context, c, e});
    out.push_back(std::move(wl));
  }
  {
    Words w(tok, 2);
    Workload wl{"W2", std::to_string(z.w2_prompt) + "-token prompt x " + std::to_string(z.w2_completions) +
                          " completions of 1-5 tokens", {}};
    // The prompt is 1000 tokens with BOS.
    const std::string prompt = w.piece(z.w2_prompt - 1, false);
    for (int32_t i = 0; i < z.w2_completions; ++i) wl.texts.push_back({prompt, w.piece(w.uniform(1, 5))});
    out.push_back(std::move(wl));
  }
  {
    Words w(tok, 3);
    Workload wl{"W3", std::to_string(z.w3_prompts) + " few-shot prompts: " + std::to_string(z.w3_instruction) +
                          "-token instruction + 3 of " + std::to_string(z.w3_pool) + " examples + a question", {}};
    const std::string instruction = w.piece(z.w3_instruction, false);
    std::vector<std::string> pool;
    for (int32_t i = 0; i < z.w3_pool; ++i) pool.push_back(w.piece(w.uniform(z.w3_example_lo, z.w3_example_hi)));
    std::vector<int32_t> order(static_cast<size_t>(z.w3_pool));
    for (int32_t p = 0; p < z.w3_prompts; ++p) {
      for (int32_t i = 0; i < z.w3_pool; ++i) order[static_cast<size_t>(i)] = i;
      std::shuffle(order.begin(), order.end(), w.rng());
      wl.texts.push_back({instruction, pool[static_cast<size_t>(order[0])], pool[static_cast<size_t>(order[1])],
                          pool[static_cast<size_t>(order[2])], w.piece(w.uniform(z.w3_question_lo, z.w3_question_hi))});
    }
    out.push_back(std::move(wl));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Measurements

float log_sum_exp(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i] - m));
  return m + static_cast<float>(std::log(s));
}

// The distinct prefixes of all paths: the nodes (root excluded) of a trie of the paths. Their
// tokens come in the order they were first met; a node's position is its depth - 1.
struct Unique {
  std::vector<int32_t> tokens;  // [n_unique]
  double mean_position = 0;
};

Unique unique_tokens(const std::vector<std::vector<int32_t>>& paths) {
  Unique u;
  std::unordered_map<uint64_t, uint32_t> child;  // (node << 32 | token) -> node
  uint32_t n_nodes = 1;                          // node 0 is the root
  double sum_positions = 0;
  for (const std::vector<int32_t>& p : paths) {
    uint32_t node = 0;
    for (size_t pos = 0; pos < p.size(); ++pos) {
      const uint64_t key = (static_cast<uint64_t>(node) << 32) | static_cast<uint32_t>(p[pos]);
      auto [it, added] = child.emplace(key, n_nodes);
      if (added) {
        ++n_nodes;
        u.tokens.push_back(p[pos]);
        sum_positions += static_cast<double>(pos);
      }
      node = it->second;
    }
  }
  if (!u.tokens.empty()) u.mean_position = sum_positions / static_cast<double>(u.tokens.size());
  return u;
}

struct RuntimeTime {
  double forward_s = 0;      // Sequence::append calls
  double forward_cpu_s = 0;  // their CPU time
  double log_softmax_s = 0;  // log-sum-exp of every logits row (not in forward_s)
  int32_t n_calls = 0;
  double mean_position = 0;  // of the rows computed
};

// The pure runtime cost of `tokens` unique tokens with every row's logits (LogitsMode::ALL, as
// the cache needs for logprobs). Measuring a fresh Cache is what the numerator already does, so
// the denominator is the plainest use of the runtime: Sequences over the tokens laid end to end,
// appended in chunks of at most 512 rows (the cache's default max_batch_tokens) and restarted
// whenever the next chunk would pass the context length. This approximates, not equals, the
// cache's work: the matmuls and the output projection match row for row, but attention work grows
// with a row's position, and the positions differ (the cache's rows sit at their depth in the
// texts, here they run 0 .. n_ctx-1); both mean positions are printed.
RuntimeTime time_runtime(const bp::Model& model, const std::vector<int32_t>& tokens) {
  const int32_t n_ctx = model.config().n_ctx;
  const int64_t n_vocab = model.config().n_vocab;
  const int32_t chunk = std::min(512, n_ctx);
  RuntimeTime rt;
  double sum_positions = 0;
  auto seq = std::make_unique<bp::Sequence>(model);
  for (size_t i = 0; i < tokens.size();) {
    const int32_t n = static_cast<int32_t>(std::min<size_t>(static_cast<size_t>(chunk), tokens.size() - i));
    if (seq->n_tokens() + n > n_ctx) seq = std::make_unique<bp::Sequence>(model);
    sum_positions += static_cast<double>(n) * (seq->n_tokens() + (n - 1) / 2.0);
    const Clock::time_point t0 = Clock::now();
    const double c0 = cpu_seconds();
    const std::vector<float> logits = seq->append(std::span<const int32_t>(tokens.data() + i, n), bp::LogitsMode::ALL);
    rt.forward_s += seconds_since(t0);
    rt.forward_cpu_s += cpu_seconds() - c0;
    ++rt.n_calls;
    const Clock::time_point t1 = Clock::now();
    volatile float sink = 0;
    for (int32_t r = 0; r < n; ++r) sink = sink + log_sum_exp(logits.data() + r * n_vocab, n_vocab);
    rt.log_softmax_s += seconds_since(t1);
    i += static_cast<size_t>(n);
  }
  if (!tokens.empty()) rt.mean_position = sum_positions / static_cast<double>(tokens.size());
  return rt;
}

// The same rows as the cache computes, at the same positions, through the runtime alone: the
// texts' token trie cut into spans where paths branch or end (as the cache's prefix tree is), each
// span attending to its chain of ancestors, packed in order into forward() calls of at most 512
// rows (the cache's default max_batch_tokens), every row's logits. What is left between this and
// the cached time is the cache's own work: tokenizing, the tree, zero-filled node buffers,
// log-softmax of every row, gathering the outputs. (A span may share a call with its parent's
// rows: forward() stores each layer's K/V before that layer's attention.)
struct SpanTime {
  double forward_s = 0, forward_cpu_s = 0;  // the forward() calls, K/V buffers included
  int32_t n_calls = 0, n_spans = 0;
};

SpanTime time_spans(const bp::Model& model, const std::vector<std::vector<int32_t>>& paths) {
  const bp::ModelConfig& cfg = model.config();
  const int64_t kv = cfg.kv_dim();
  struct Span {
    int32_t parent = -1;  // span index, -1: none
    int32_t pos0 = 0;
    std::vector<int32_t> tokens;
    std::unique_ptr<float[]> k, v;  // [n_layer][n_tokens][kv_dim]
  };
  // Trie of tokens first: which nodes branch and where paths end.
  struct TrieNode {
    int32_t parent;
    int32_t token;
    int32_t n_children = 0;
    bool ends = false;
  };
  std::vector<TrieNode> trie{{-1, -1}};            // [n_nodes], 0 is the root
  std::unordered_map<uint64_t, int32_t> child;    // (node << 32 | token) -> node
  for (const std::vector<int32_t>& p : paths) {
    int32_t node = 0;
    for (int32_t t : p) {
      const uint64_t key = (static_cast<uint64_t>(node) << 32) | static_cast<uint32_t>(t);
      auto [it, added] = child.emplace(key, static_cast<int32_t>(trie.size()));
      if (added) {
        trie[static_cast<size_t>(node)].n_children++;
        trie.push_back({node, t});
      }
      node = it->second;
    }
    trie[static_cast<size_t>(node)].ends = true;
  }
  // Spans: a node continues its parent's span unless the parent is the root, branches or ends a
  // path. Nodes are numbered parents first, so spans are too.
  std::vector<Span> spans;
  std::vector<int32_t> span_of(trie.size(), -1);  // [n_nodes]
  for (size_t i = 1; i < trie.size(); ++i) {
    const TrieNode& n = trie[i];
    const TrieNode& p = trie[static_cast<size_t>(n.parent)];
    if (n.parent == 0 || p.n_children > 1 || p.ends) {
      Span s;
      s.parent = span_of[static_cast<size_t>(n.parent)];
      s.pos0 = s.parent < 0 ? 0 : spans[static_cast<size_t>(s.parent)].pos0 +
                                      static_cast<int32_t>(spans[static_cast<size_t>(s.parent)].tokens.size());
      spans.push_back(std::move(s));
      span_of[i] = static_cast<int32_t>(spans.size() - 1);
    } else {
      span_of[i] = span_of[static_cast<size_t>(n.parent)];
    }
    spans[static_cast<size_t>(span_of[i])].tokens.push_back(n.token);
  }

  SpanTime st;
  st.n_spans = static_cast<int32_t>(spans.size());
  const Clock::time_point t0 = Clock::now();
  const double c0 = cpu_seconds();
  for (Span& s : spans) {
    s.k = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(cfg.n_layer) * s.tokens.size() * kv);
    s.v = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(cfg.n_layer) * s.tokens.size() * kv);
  }
  struct Work {
    int32_t span, begin, end;
  };
  std::vector<Work> works;
  for (size_t i = 0; i < spans.size(); ++i)
    for (int32_t b = 0; b < static_cast<int32_t>(spans[i].tokens.size()); b += 512)
      works.push_back({static_cast<int32_t>(i), b, std::min(static_cast<int32_t>(spans[i].tokens.size()), b + 512)});
  for (size_t next = 0; next < works.size();) {
    size_t end = next;
    int32_t rows = 0;
    while (end < works.size() && (end == next || rows + works[end].end - works[end].begin <= 512)) {
      rows += works[end].end - works[end].begin;
      ++end;
    }
    std::vector<std::vector<bp::KvSpanView>> pasts(end - next);  // [n_spans_in_call][n_ancestors]
    std::vector<std::vector<float>> logits(end - next);          // [n_spans_in_call][rows][n_vocab]
    std::vector<bp::ForwardSpan> batch(end - next);
    for (size_t i = 0; i < batch.size(); ++i) {
      const Work& w = works[next + i];
      Span& s = spans[static_cast<size_t>(w.span)];
      std::vector<const Span*> chain;
      for (int32_t a = s.parent; a >= 0; a = spans[static_cast<size_t>(a)].parent) chain.push_back(&spans[static_cast<size_t>(a)]);
      for (auto it = chain.rbegin(); it != chain.rend(); ++it)
        pasts[i].push_back({(*it)->k.get(), (*it)->v.get(), static_cast<int32_t>((*it)->tokens.size()), 0});
      const int64_t stride = static_cast<int64_t>(s.tokens.size()) * kv;
      if (w.begin > 0) pasts[i].push_back({s.k.get(), s.v.get(), w.begin, stride});
      logits[i].resize(static_cast<size_t>(w.end - w.begin) * cfg.n_vocab);
      bp::ForwardSpan& f = batch[i];
      f.past = pasts[i];
      f.tokens = std::span<const int32_t>(s.tokens.data() + w.begin, static_cast<size_t>(w.end - w.begin));
      f.pos0 = s.pos0 + w.begin;
      f.k_out = s.k.get() + w.begin * kv;
      f.v_out = s.v.get() + w.begin * kv;
      f.out_layer_stride = stride;
      f.logits = bp::LogitsMode::ALL;
      f.logits_out = logits[i].data();
    }
    bp::forward(model, batch);
    ++st.n_calls;
    next = end;
  }
  st.forward_s = seconds_since(t0);
  st.forward_cpu_s = cpu_seconds() - c0;
  return st;
}

// Logprobs of tokens 1.. of `path` computed from scratch.
std::vector<float> scratch_logprobs(const bp::Model& model, const std::vector<int32_t>& path) {
  const int64_t n_vocab = model.config().n_vocab;
  bp::Sequence seq(model);
  const std::vector<float> logits = seq.append(path, bp::LogitsMode::ALL);  // [n][n_vocab]
  std::vector<float> lp;                                                    // [n - 1]
  for (size_t i = 1; i < path.size(); ++i) {
    const float* row = logits.data() + static_cast<int64_t>(i - 1) * n_vocab;
    lp.push_back(row[path[i]] - log_sum_exp(row, n_vocab));
  }
  return lp;
}

// One cached evaluation of a workload, as a user writes it.
struct CachedRun {
  double total_s = 0, eval_s = 0, read_s = 0, cpu_s = 0;
  bp::CacheStats stats;                      // after eval (reading outputs back re-walks the tree)
  std::vector<std::vector<float>> logprobs;  // [n_texts][n_tokens - 1]
  std::vector<std::vector<int32_t>> paths;   // [n_texts][n_tokens]
};

CachedRun run_cached(const std::shared_ptr<bp::Model>& model, const Workload& wl, const std::string& store = "") {
  CachedRun c;
  const Clock::time_point t0 = Clock::now();
  const double c0 = cpu_seconds();
  bp::CacheOptions opt;
  opt.store = store;
  bp::Cache cache(model, opt);
  std::vector<bp::Text> texts;
  for (const std::vector<std::string>& segs : wl.texts) {
    bp::Text t = cache.text(segs[0]);
    for (size_t i = 1; i < segs.size(); ++i) t = t + segs[i];
    texts.push_back(std::move(t));
  }
  bp::EvalOptions eo;
  eo.logprobs = true;
  cache.eval(texts, eo);
  c.eval_s = seconds_since(t0);
  c.stats = cache.stats();
  const Clock::time_point t1 = Clock::now();
  for (const bp::Text& t : texts) c.logprobs.push_back(t.logprobs());
  cache.flush();  // a run with a store ends when its blocks are written
  c.read_s = seconds_since(t1);
  c.total_s = seconds_since(t0);
  c.cpu_s = cpu_seconds() - c0;
  for (const bp::Text& t : texts) c.paths.push_back(t.tokens());
  return c;
}

struct Result {
  std::string name;
  size_t n_texts = 0, n_tokens = 0, n_unique = 0, min_len = 0, max_len = 0;
  double unique_mean_position = 0;
  CachedRun cached;  // the fastest of the reps (its own cpu time)
  double scratch_s = 0;
  size_t n_sampled = 0;
  RuntimeTime runtime;  // the fastest of the reps
  SpanTime spans;       // the fastest of the reps
  double max_diff = 0;
};

// `n_reps` alternating rounds of (cached, runtime alone, runtime on the spans), keeping the fastest of each: the
// minimum is the figure least disturbed by other work on the machine.
Result run_workload(const std::shared_ptr<bp::Model>& model, const Workload& wl, size_t n_sample, int32_t n_reps) {
  Result r;
  r.name = wl.name;
  r.n_texts = wl.texts.size();
  Unique unique;
  for (int32_t rep = 0; rep < n_reps; ++rep) {
    CachedRun c = run_cached(model, wl);
    if (rep == 0) {
      unique = unique_tokens(c.paths);
      r.n_unique = unique.tokens.size();
      r.unique_mean_position = unique.mean_position;
    }
    if (rep == 0 || c.total_s < r.cached.total_s) r.cached = std::move(c);
    const RuntimeTime rt = time_runtime(*model, unique.tokens);
    if (rep == 0 || rt.forward_s < r.runtime.forward_s) r.runtime = rt;
    const SpanTime st = time_spans(*model, r.cached.paths);
    if (rep == 0 || st.forward_s < r.spans.forward_s) r.spans = st;
  }
  r.min_len = SIZE_MAX;
  for (const auto& p : r.cached.paths) {
    r.n_tokens += p.size();
    r.min_len = std::min(r.min_len, p.size());
    r.max_len = std::max(r.max_len, p.size());
  }

  // From scratch, on evenly spaced sample texts.
  const std::vector<std::vector<int32_t>>& paths = r.cached.paths;
  r.n_sampled = std::min(n_sample, paths.size());
  double sampled_s = 0;
  for (size_t k = 0; k < r.n_sampled; ++k) {
    const size_t i = k * paths.size() / r.n_sampled;
    const Clock::time_point t0 = Clock::now();
    const std::vector<float> lp = scratch_logprobs(*model, paths[i]);
    sampled_s += seconds_since(t0);
    BP_ASSERT(lp.size() == r.cached.logprobs[i].size());
    for (size_t j = 0; j < lp.size(); ++j)
      r.max_diff = std::max(r.max_diff, static_cast<double>(std::fabs(lp[j] - r.cached.logprobs[i][j])));
  }
  r.scratch_s = r.n_sampled ? sampled_s / static_cast<double>(r.n_sampled) * static_cast<double>(paths.size()) : 0;
  return r;
}

void print_result(const Result& r, const Workload& wl, int32_t n_reps) {
  const CachedRun& c = r.cached;
  std::printf("%s: %s (%zu texts of %zu-%zu tokens, %zu tokens in all)\n", r.name.c_str(), wl.what.c_str(), r.n_texts,
              r.min_len, r.max_len, r.n_tokens);
  std::printf("  cached:        %8.2f s  (eval %.2f s + reading logprobs %.2f s; cpu %.2f s%s); %llu tokens computed, "
              "%llu forward calls, %llu evictions\n",
              c.total_s, c.eval_s, c.read_s, c.cpu_s, n_reps > 1 ? "; fastest of the reps" : "",
              static_cast<unsigned long long>(c.stats.tokens_computed),
              static_cast<unsigned long long>(c.stats.forward_calls), static_cast<unsigned long long>(c.stats.evictions));
  std::printf("  from scratch:  %8.2f s  (%s %zu of %zu texts: %.3f s per text)\n", r.scratch_s,
              r.n_sampled < r.n_texts ? "EXTRAPOLATED from" : "all", r.n_sampled, r.n_texts,
              r.n_sampled ? r.scratch_s / static_cast<double>(r.n_texts) : 0.0);
  std::printf("  unique tokens: %8zu    (%.1fx fewer than in all texts; mean position %.0f)\n", r.n_unique,
              static_cast<double>(r.n_tokens) / static_cast<double>(std::max<size_t>(1, r.n_unique)),
              r.unique_mean_position);
  std::printf("  runtime alone: %8.2f s  (cpu %.2f s; %d Sequence::append calls of <= 512 rows, ALL logits, mean "
              "position %.0f; the log-softmax of those rows takes %.2f s more)\n",
              r.runtime.forward_s, r.runtime.forward_cpu_s, r.runtime.n_calls, r.runtime.mean_position,
              r.runtime.log_softmax_s);
  std::printf("  runtime on the cache's spans: %.2f s  (cpu %.2f s; %d spans at their own positions, %d forward() "
              "calls of <= 512 rows, ALL logits)\n",
              r.spans.forward_s, r.spans.forward_cpu_s, r.spans.n_spans, r.spans.n_calls);
  std::printf("  cached / runtime alone: %.2f (goal <= 1.2; by cpu time %.2f); cached / runtime on the spans: %.2f "
              "(cpu %.2f); speedup over scratch: %.1fx\n",
              c.total_s / r.runtime.forward_s, c.cpu_s / r.runtime.forward_cpu_s, c.total_s / r.spans.forward_s,
              c.cpu_s / r.spans.forward_cpu_s, r.scratch_s / c.total_s);
  std::printf("  check: max |logprob cached - scratch| on the sampled texts: %.2g\n", r.max_diff);
  std::fflush(stdout);
}
int run(int argc, char** argv) {
  std::string model_path;
  bool quick = false;
  size_t n_sample = 8;
  int n_threads = 0;
  int32_t n_reps = 1;
  std::string only;   // run only this workload (e.g. W3)
  std::string store;  // --store URI: only the cached run, against this persistent store
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else if (a == "--sample" && i + 1 < argc) n_sample = static_cast<size_t>(std::max(1, std::atoi(argv[++i])));
    else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else if (a == "--reps" && i + 1 < argc) n_reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--store" && i + 1 < argc) store = argv[++i];
    else if ((a == "-t" || a == "--threads") && i + 1 < argc) n_threads = std::atoi(argv[++i]);
    else if (a == "-h" || a == "--help") {
      std::printf("usage: bench_cache MODEL [--quick] [--sample N] [--only W1|W2|W3] [--reps N] [-t THREADS]\n"
                  "Cache workloads W1-W3 (see bench/README.md); MODEL: llama-110m f32 GGUF.\n"
                  "  --quick       smaller workloads (smoke run)\n"
                  "  --sample N    texts computed from scratch per workload, extrapolated (default 8)\n"
                  "  --only W      run one workload\n"
                  "  --reps N      rounds of (cached, runtime alone), keeping the fastest of each (default 1)\n"
                  "  --store URI   only the cached run, with this persistent store (dir:PATH or redis://HOST:PORT);\n"
                  "                run twice in two processes to see what the second run loads\n"
                  "  -t THREADS    OpenMP threads (default: all cores)\n");
      return 0;
    } else if (model_path.empty() && !a.empty() && a[0] != '-') model_path = a;
    else {
      std::fprintf(stderr, "bench_cache: error: unexpected argument '%s' (see --help)\n", a.c_str());
      return 2;
    }
  }
  if (model_path.empty()) {
    std::fprintf(stderr, "bench_cache: error: no model given (see --help)\n");
    return 2;
  }
  omp_set_num_threads(n_threads > 0 ? n_threads : omp_get_num_procs());

  std::shared_ptr<bp::Model> model = bp::Model::load(model_path);
  const bp::ModelConfig& cfg = model->config();
  std::printf("model: %s (%s, %.2fM params, %s, n_ctx %d), threads: %d, sizes: %s\n", model_path.c_str(),
              bp::arch_name(cfg.arch), static_cast<double>(model->n_params()) / 1e6, model->weight_type_name().c_str(),
              cfg.n_ctx, omp_get_max_threads(), quick ? "quick" : "full");
  {  // Warm-up: page the weights in and let the allocator and oneDNN settle.
    bp::Sequence seq(*model);
    std::vector<int32_t> t(64, 1);
    seq.append(t, bp::LogitsMode::ALL);
  }

  const std::vector<Workload> workloads = make_workloads(model->tokenizer(), quick ? QUICK : FULL);
  if (!store.empty()) {
    for (const Workload& wl : workloads) {
      if (!only.empty() && wl.name != only) continue;
      const CachedRun c = run_cached(model, wl, store);
      std::printf("%s with store %s: wall %.3f s (eval %.3f s, cpu %.3f s); tokens computed %llu, loaded %llu, reused %llu\n",
                  wl.name.c_str(), store.c_str(), c.total_s, c.eval_s, c.cpu_s,
                  static_cast<unsigned long long>(c.stats.tokens_computed), static_cast<unsigned long long>(c.stats.tokens_loaded),
                  static_cast<unsigned long long>(c.stats.tokens_reused));
    }
    return 0;
  }
  std::vector<Result> results;
  for (const Workload& wl : workloads) {
    if (!only.empty() && wl.name != only) continue;
    results.push_back(run_workload(model, wl, n_sample, n_reps));
    print_result(results.back(), wl, n_reps);
  }

  std::printf("\n%-4s %6s %8s %8s %9s %9s %11s %8s %10s %7s %9s %8s %9s\n", "", "texts", "tokens", "unique",
              "computed", "cached_s", "scratch_s*", "speedup", "runtime_s", "ratio", "cpu_ratio", "spans_s", "ratio_sp");
  for (const Result& r : results) {
    std::printf("%-4s %6zu %8zu %8zu %9llu %9.2f %11.2f %7.1fx %10.2f %7.2f %9.2f %8.2f %9.2f\n", r.name.c_str(),
                r.n_texts, r.n_tokens, r.n_unique, static_cast<unsigned long long>(r.cached.stats.tokens_computed),
                r.cached.total_s, r.scratch_s, r.scratch_s / r.cached.total_s, r.runtime.forward_s,
                r.cached.total_s / r.runtime.forward_s, r.cached.cpu_s / r.runtime.forward_cpu_s, r.spans.forward_s,
                r.cached.total_s / r.spans.forward_s);
  }
  std::printf("* scratch_s is extrapolated from %zu sampled texts per workload where a workload has more.\n", n_sample);
  std::printf("ratio = cached_s / runtime_s (Sequences over the unique tokens end to end); goal <= 1.2; cpu_ratio: the same "
              "by CPU time\nratio_sp = cached_s / spans_s (the same rows at the same positions through forward() alone): "
              "the cache's own overhead\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const bp::Error& e) {
    std::fprintf(stderr, "bench_cache: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cache: error: %s\n", e.what());
    return 1;
  }
}
