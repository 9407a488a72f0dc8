// Shared by the cache tests (test_cache.cpp: properties and content addressing;
// test_cache_semantics.cpp: splits, pins, budget, generation, errors): the models, the uncached
// reference (one Sequence pass per distinct token sequence) and the random concatenation graphs.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "backprompt/model.h"
#include "backprompt/text.h"
#include "model/make_model.h"
#include "model/runtime.h"
#include "test_util.h"

namespace bp = backprompt;

namespace cache_test {

using bp::testing::compare_logits;
using bp::testing::generated_model;

// ---------------------------------------------------------------------------------------------
// Models

inline std::shared_ptr<bp::Model> tiny_model(bp::Arch arch) { return bp::Model::load(generated_model(arch, bp::DType::F32)); }

inline std::shared_ptr<bp::Model> stories_model() {
  const std::string path = bp::testing::test_data_file("stories260k/stories260K.gguf");
  return path.empty() ? nullptr : bp::Model::load(path);
}

// The tiny GPT-2 preset with GPT-2's real 50257-token vocabulary (made once per process).
inline std::shared_ptr<bp::Model> gpt2_vocab_model() {
  static std::string made;
  if (made.empty()) {
    const std::string vocab = bp::testing::test_data_file("ggml-vocab/ggml-vocab-gpt-2.gguf");
    if (vocab.empty()) return nullptr;
    bp::MakeModelOptions opt;
    opt.arch = bp::Arch::GPT2;
    opt.preset = "tiny";
    opt.vocab_path = vocab;
    made = bp::testing::temp_dir() + "/cache-gpt2-vocab-tiny.gguf";
    bp::make_model(opt, made);
  }
  return bp::Model::load(made);
}

#define REQUIRE_MODEL(var, expr, what)                                              \
  auto var = (expr);                                                                \
  if (!var) GTEST_SKIP() << "test data " what " not found (BACKPROMPT_TEST_DATA)"

// K/V + logprob + one logits row per token: what one text's path can hold at most (a path of
// one-token nodes, each keeping its last logits).
inline uint64_t worst_case_bytes(const bp::Model& m, size_t n_tokens) {
  const bp::ModelConfig& c = m.config();
  const uint64_t per_token = 2ull * c.n_layer * c.kv_dim() * sizeof(float) + sizeof(float) +
                             static_cast<uint64_t>(c.n_vocab) * sizeof(float);
  return per_token * n_tokens;
}

// ---------------------------------------------------------------------------------------------
// The uncached reference: one full pass per distinct token sequence, kept compactly.

struct Reference {
  std::vector<float> last_logits;  // [n_vocab] after the last token
  std::vector<double> logprobs;    // [n] log p(tokens[i] | before); logprobs[0] unused
  std::vector<double> tolerance;   // [n] 1e-4 * max(1, max |logit|) of the row logprobs[i] comes from
};

class Oracle {
 public:
  explicit Oracle(const bp::Model& m) : model_(m) {}

  const Reference& get(const std::vector<int32_t>& tokens) {
    auto it = memo_.find(tokens);
    if (it != memo_.end()) return it->second;
    const int64_t V = model_.config().n_vocab;
    const size_t n = tokens.size();
    bp::Sequence seq(model_);
    const std::vector<float> logits = seq.append(tokens, bp::LogitsMode::ALL);  // [n][n_vocab]
    Reference r;
    r.last_logits.assign(logits.end() - V, logits.end());
    r.logprobs.assign(n, 0.0);
    r.tolerance.assign(n, 0.0);
    for (size_t i = 1; i < n; ++i) {
      const float* row = logits.data() + static_cast<int64_t>(i - 1) * V;
      double m = -INFINITY, max_abs = 0.0;
      for (int64_t j = 0; j < V; ++j) {
        m = std::max(m, static_cast<double>(row[j]));
        max_abs = std::max(max_abs, std::abs(static_cast<double>(row[j])));
      }
      double s = 0.0;
      for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<double>(row[j]) - m);
      r.logprobs[i] = static_cast<double>(row[tokens[i]]) - m - std::log(s);
      r.tolerance[i] = 1e-4 * std::max(1.0, max_abs);
    }
    return memo_.emplace(tokens, std::move(r)).first->second;
  }

 private:
  const bp::Model& model_;
  std::map<std::vector<int32_t>, Reference> memo_;
};

inline std::string label(const bp::Text& t) {
  std::string s;
  for (const std::string& seg : t.segments()) {
    s += s.empty() ? "[" : "|";
    for (char ch : seg) {
      if (ch == '\n') s += "\\n";
      else s += ch;
    }
    if (s.size() > 120) break;
  }
  return s + "]";
}

inline ::testing::AssertionResult next_logits_exact(const bp::Text& t, Oracle& oracle) {
  const std::vector<int32_t> tokens = t.tokens();
  if (tokens.empty()) return ::testing::AssertionFailure() << "text " << label(t) << " has no tokens";
  const std::vector<float> got = t.next_logits();
  const Reference& ref = oracle.get(tokens);
  if (got.size() != ref.last_logits.size())
    return ::testing::AssertionFailure() << "next_logits of " << label(t) << ": " << got.size() << " values, want "
                                         << ref.last_logits.size();
  const bp::testing::LogitCompare c = compare_logits(got.data(), ref.last_logits.data(), static_cast<int64_t>(got.size()));
  for (float x : got)
    if (!std::isfinite(x)) return ::testing::AssertionFailure() << "next_logits of " << label(t) << " not finite";
  if (!c.within_tolerance() || !c.same_argmax)
    return ::testing::AssertionFailure() << "next_logits of " << label(t) << " (" << tokens.size()
                                         << " tokens): max diff " << c.max_abs_diff << ", max |logit| " << c.max_abs_ref
                                         << ", same argmax " << c.same_argmax;
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult logprobs_exact(const bp::Text& t, Oracle& oracle, size_t begin = 1) {
  const std::vector<int32_t> tokens = t.tokens();
  const std::vector<float> got = t.logprobs(begin);
  const size_t first = std::max<size_t>(begin, 1);
  const size_t want_n = tokens.size() > first ? tokens.size() - first : 0;
  if (got.size() != want_n)
    return ::testing::AssertionFailure() << "logprobs(" << begin << ") of " << label(t) << ": " << got.size()
                                         << " values, want " << want_n;
  if (want_n == 0) return ::testing::AssertionSuccess();
  const Reference& ref = oracle.get(tokens);
  for (size_t k = 0; k < want_n; ++k) {
    const size_t i = first + k;
    const double diff = std::abs(static_cast<double>(got[k]) - ref.logprobs[i]);
    if (!std::isfinite(got[k]) || diff > ref.tolerance[i])
      return ::testing::AssertionFailure() << "logprob of token " << i << " of " << label(t) << " (" << tokens.size()
                                           << " tokens): got " << got[k] << ", want " << ref.logprobs[i];
  }
  return ::testing::AssertionSuccess();
}

template <class F>
inline ::testing::AssertionResult throws_code(F&& f, bp::ErrorCode code) {
  try {
    f();
  } catch (const bp::Error& e) {
    if (e.code() == code) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "threw " << bp::error_code_name(e.code()) << ": " << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-backprompt exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// Number of distinct non-empty prefixes of the sequences: the tokens a cache must compute once.
inline uint64_t distinct_prefixes(const std::vector<std::vector<int32_t>>& seqs) {
  std::map<std::pair<int64_t, int32_t>, int64_t> trie;  // (node, token) -> child node
  int64_t next = 1;
  for (const auto& s : seqs) {
    int64_t node = 0;
    for (int32_t t : s) {
      auto [it, added] = trie.emplace(std::make_pair(node, t), next);
      if (added) ++next;
      node = it->second;
    }
  }
  return static_cast<uint64_t>(trie.size());
}

// ---------------------------------------------------------------------------------------------
// Random concatenation graphs

inline std::vector<std::string> piece_pool(std::mt19937& rng) {
  std::vector<std::string> pool = {
      "", "", "\n", "\n", "\n\n", " ", "  ", "\t", "héllo wörld ✓ 日本語", "12345", "3.14", " 42",
      "Once upon a time", " there was", " a little", " cat", " dog", ".", ",", "!", "'s", " the",
      "The", " end", "a", "b", "ab", " ", "Hello", " world", "x", "-", "(", ")", "\"", ":"};
  const std::string letters = "abcdefghijklmnopqrstuvwxyz";
  for (int i = 0; i < 12; ++i) {
    std::string w = (rng() % 2) ? " " : "";
    const int len = 1 + static_cast<int>(rng() % 7);
    for (int j = 0; j < len; ++j) w += letters[rng() % letters.size()];
    pool.push_back(w);
  }
  for (int i = 0; i < 4; ++i) pool.push_back(std::to_string(rng() % 100000));
  return pool;
}

// 30-60 texts from a random graph of `+` over string pieces, token pieces, Text+string and
// string+Text, with left and right nesting, shared sub-texts and repeats. At most max_tokens each.
inline std::vector<bp::Text> random_texts(bp::Cache& cache, uint32_t seed, size_t max_tokens) {
  std::mt19937 rng(seed);
  const std::vector<std::string> pool = piece_pool(rng);
  const int32_t n_vocab = cache.model().config().n_vocab;
  auto pick_piece = [&] { return pool[rng() % pool.size()]; };

  std::vector<bp::Text> all;  // every text built so far
  for (const std::string& p : pool) all.push_back(cache.text(p));
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> ids(1 + rng() % 4);
    for (int32_t& id : ids) id = static_cast<int32_t>(rng() % static_cast<uint32_t>(n_vocab));
    all.push_back(cache.tokens(ids));
  }
  const size_t n_leaves = all.size();
  auto pick = [&]() -> const bp::Text& {
    // Favour recent (longer, more shared) texts.
    const size_t n = all.size();
    return (rng() % 3 == 0) ? all[rng() % n] : all[n - 1 - rng() % std::min<size_t>(n, 12)];
  };
  int tries = 0;
  while (all.size() < n_leaves + 90 && tries++ < 2000) {
    bp::Text t;
    switch (rng() % 6) {
      case 0: t = pick() + pick(); break;
      case 1: t = pick() + pick_piece(); break;
      case 2: t = pick_piece() + pick(); break;
      case 3: { bp::Text a = pick(), b = pick(), c = pick(); t = a + (b + c); break; }
      case 4: { bp::Text a = pick(), b = pick(), c = pick(); t = (a + b) + c; break; }
      default: t = pick() + cache.text(pick_piece()) + pick_piece(); break;
    }
    if (t.n_tokens() <= max_tokens) all.push_back(t);
  }
  const size_t n_texts = 30 + rng() % 31;
  std::vector<bp::Text> out;
  for (size_t i = 0; i < n_texts; ++i) {
    if (!out.empty() && rng() % 10 == 0) out.push_back(out[rng() % out.size()]);  // a repeat
    else if (rng() % 6 == 0) out.push_back(all[rng() % n_leaves]);
    else out.push_back(all[n_leaves + rng() % (all.size() - n_leaves)]);
  }
  return out;
}

enum class Mode { LAZY, BATCHED, SMALL_BUDGET, SMALL_BUDGET_BATCHED, SMALL_BATCHES };

inline const char* mode_name(Mode m) {
  switch (m) {
    case Mode::LAZY: return "lazy";
    case Mode::BATCHED: return "batched";
    case Mode::SMALL_BUDGET: return "small budget";
    case Mode::SMALL_BUDGET_BATCHED: return "small budget, batched";
    case Mode::SMALL_BATCHES: return "max_batch_tokens 3";
  }
  return "?";
}

// Runs one random graph in one mode on a fresh cache; every output must match the oracle.
inline void check_random_graph(const std::shared_ptr<bp::Model>& model, Oracle& oracle, uint32_t seed, Mode mode,
                        size_t max_tokens) {
  SCOPED_TRACE(std::string("seed ") + std::to_string(seed) + ", " + mode_name(mode));
  bp::CacheOptions opt;
  const bool small_budget = mode == Mode::SMALL_BUDGET || mode == Mode::SMALL_BUDGET_BATCHED;
  if (small_budget) opt.memory_budget = worst_case_bytes(*model, max_tokens);
  if (mode == Mode::SMALL_BATCHES) opt.max_batch_tokens = 3;
  bp::Cache cache(model, opt);
  const std::vector<bp::Text> texts = random_texts(cache, seed, max_tokens);
  ASSERT_EQ(cache.stats().tokens_computed, 0u) << "building texts must cost no model work";
  ASSERT_EQ(cache.stats().forward_calls, 0u);

  std::vector<std::vector<int32_t>> all_tokens;
  for (const bp::Text& t : texts) all_tokens.push_back(t.tokens());
  auto check_budget = [&](const char* after) {
    if (!small_budget) return;
    EXPECT_LE(cache.stats().bytes, opt.memory_budget) << "over budget after " << after;
  };
  // Outputs of one text (or the error for a text with no tokens).
  std::mt19937 rng(seed * 7 + 1);
  auto check = [&](const bp::Text& t, int how) {
    if (t.tokens().empty()) {
      EXPECT_TRUE(throws_code([&] { t.next_logits(); }, bp::ErrorCode::INVALID_ARGUMENT)) << label(t);
      EXPECT_TRUE(t.logprobs().empty());
      return;
    }
    switch (how) {
      case 0:
        EXPECT_TRUE(next_logits_exact(t, oracle));
        check_budget("next_logits");
        EXPECT_TRUE(logprobs_exact(t, oracle));
        break;
      case 1:
        EXPECT_TRUE(logprobs_exact(t, oracle));
        check_budget("logprobs");
        EXPECT_TRUE(next_logits_exact(t, oracle));
        break;
      case 2:
        EXPECT_TRUE(next_logits_exact(t, oracle));
        break;
      default:
        EXPECT_TRUE(logprobs_exact(t, oracle, 1 + rng() % (t.n_tokens() + 1)));
        break;
    }
    check_budget("outputs");
  };

  switch (mode) {
    case Mode::LAZY:
    case Mode::SMALL_BUDGET:
      for (const bp::Text& t : texts) check(t, static_cast<int>(rng() % 4));
      break;
    case Mode::BATCHED:
    case Mode::SMALL_BUDGET_BATCHED: {
      bp::EvalOptions eo;
      eo.logprobs = true;
      cache.eval(texts, eo);
      check_budget("eval");
      const bp::CacheStats after_eval = cache.stats();
      if (mode == Mode::BATCHED) {
        EXPECT_EQ(after_eval.tokens_computed, distinct_prefixes(all_tokens)) << "each distinct prefix computed once";
        EXPECT_EQ(after_eval.tokens_recomputed, 0u);
      }
      for (const bp::Text& t : texts) check(t, static_cast<int>(rng() % 2));
      if (mode == Mode::BATCHED) {
        // Everything was computed by eval: reading outputs runs no model.
        const bp::CacheStats s = cache.stats();
        EXPECT_EQ(s.tokens_computed, after_eval.tokens_computed);
        EXPECT_EQ(s.tokens_recomputed, after_eval.tokens_recomputed);
        EXPECT_EQ(s.forward_calls, after_eval.forward_calls);
      }
      break;
    }
    case Mode::SMALL_BATCHES: {
      // The first half batched (chunks of 3 rows), the rest lazily, then the first half re-read.
      const size_t half = texts.size() / 2;
      bp::EvalOptions eo;
      eo.logprobs = true;
      cache.eval(std::span<const bp::Text>(texts.data(), half), eo);
      EXPECT_GE(cache.stats().forward_calls * 3, cache.stats().tokens_computed);
      for (size_t i = half; i < texts.size(); ++i) check(texts[i], static_cast<int>(rng() % 4));
      for (size_t i = 0; i < half; ++i) check(texts[i], static_cast<int>(rng() % 2));
      break;
    }
  }
  // Second pass in a shuffled order: splits since the first pass must not change any output.
  std::vector<size_t> order(texts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (size_t i : order) check(texts[i], static_cast<int>(rng() % 4));

  const bp::CacheStats s = cache.stats();
  if (!small_budget) {
    // Nothing evicted: every distinct prefix was computed exactly once.
    EXPECT_EQ(s.tokens_computed, distinct_prefixes(all_tokens));
    EXPECT_EQ(s.evictions, 0u);
  } else {
    EXPECT_GT(s.evictions, 0u) << "budget " << opt.memory_budget << " should force evictions";
    EXPECT_GT(s.tokens_computed, distinct_prefixes(all_tokens)) << "evicted nodes are recomputed";
  }
  EXPECT_GT(s.tokens_reused, 0u);
}

inline void check_all_modes(const std::shared_ptr<bp::Model>& model, std::vector<uint32_t> seeds, size_t max_tokens) {
  Oracle oracle(*model);
  for (uint32_t seed : seeds)
    for (Mode m : {Mode::LAZY, Mode::BATCHED, Mode::SMALL_BUDGET, Mode::SMALL_BUDGET_BATCHED, Mode::SMALL_BATCHES})
      check_random_graph(model, oracle, seed, m, max_tokens);
}

// Greedy decoding with the uncached Sequence: up to n tokens, stopping after EOS.
inline std::vector<int32_t> greedy_reference(const bp::Model& m, const std::vector<int32_t>& prompt, int32_t n) {
  bp::Sequence seq(m);
  std::vector<float> logits = seq.append(prompt);
  std::vector<int32_t> out;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t tok = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(tok);
    if (tok == m.tokenizer().eos()) break;
    logits = seq.append(std::span<const int32_t>(&tok, 1));
  }
  return out;
}

inline std::vector<int32_t> random_ids(int32_t n_vocab, size_t n, uint32_t seed, int32_t lo = 0) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(lo, n_vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

}  // namespace cache_test
