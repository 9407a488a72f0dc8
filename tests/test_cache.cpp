// The lazy KV cache against the uncached reference path (one Sequence pass over text.tokens()):
// random concatenation graphs evaluated lazily, batched, under a budget that forces evictions,
// and in tiny forward chunks; tokenization policies and seams; content addressing; splits that
// lose logits; pins; generation into the tree; errors; eager texts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "backprompt/model.h"
#include "backprompt/text.h"
#include "model/make_model.h"
#include "model/runtime.h"
#include "test_util.h"

namespace bp = backprompt;
using bp::testing::compare_logits;
using bp::testing::generated_model;

namespace {

// ---------------------------------------------------------------------------------------------
// Models

std::shared_ptr<bp::Model> tiny_model(bp::Arch arch) { return bp::Model::load(generated_model(arch, bp::DType::F32)); }

std::shared_ptr<bp::Model> stories_model() {
  const std::string path = bp::testing::test_data_file("stories260k/stories260K.gguf");
  return path.empty() ? nullptr : bp::Model::load(path);
}

// The tiny GPT-2 preset with GPT-2's real 50257-token vocabulary (made once per process).
std::shared_ptr<bp::Model> gpt2_vocab_model() {
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
uint64_t worst_case_bytes(const bp::Model& m, size_t n_tokens) {
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

std::string label(const bp::Text& t) {
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

::testing::AssertionResult next_logits_exact(const bp::Text& t, Oracle& oracle) {
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

::testing::AssertionResult logprobs_exact(const bp::Text& t, Oracle& oracle, size_t begin = 1) {
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
::testing::AssertionResult throws_code(F&& f, bp::ErrorCode code) {
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
uint64_t distinct_prefixes(const std::vector<std::vector<int32_t>>& seqs) {
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

std::vector<std::string> piece_pool(std::mt19937& rng) {
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
std::vector<bp::Text> random_texts(bp::Cache& cache, uint32_t seed, size_t max_tokens) {
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

const char* mode_name(Mode m) {
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
void check_random_graph(const std::shared_ptr<bp::Model>& model, Oracle& oracle, uint32_t seed, Mode mode,
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

void check_all_modes(const std::shared_ptr<bp::Model>& model, std::vector<uint32_t> seeds, size_t max_tokens) {
  Oracle oracle(*model);
  for (uint32_t seed : seeds)
    for (Mode m : {Mode::LAZY, Mode::BATCHED, Mode::SMALL_BUDGET, Mode::SMALL_BUDGET_BATCHED, Mode::SMALL_BATCHES})
      check_random_graph(model, oracle, seed, m, max_tokens);
}

// Greedy decoding with the uncached Sequence: up to n tokens, stopping after EOS.
std::vector<int32_t> greedy_reference(const bp::Model& m, const std::vector<int32_t>& prompt, int32_t n) {
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

std::vector<int32_t> random_ids(int32_t n_vocab, size_t n, uint32_t seed, int32_t lo = 0) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(lo, n_vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// 1. Cached == uncached on random concatenation graphs

TEST(CacheProperty, Gpt2Tiny) { check_all_modes(tiny_model(bp::Arch::GPT2), {11, 12}, 150); }

TEST(CacheProperty, LlamaTiny) { check_all_modes(tiny_model(bp::Arch::LLAMA), {21, 22}, 150); }

TEST(CacheProperty, Stories260K) {
  REQUIRE_MODEL(model, stories_model(), "stories260k/stories260K.gguf");
  check_all_modes(model, {31, 32}, 120);
}

TEST(CacheProperty, Gpt2VocabLazy) {
  // GPT-2's real BPE: seams where per-segment tokens differ from joined ones are everywhere.
  REQUIRE_MODEL(model, gpt2_vocab_model(), "ggml-vocab/ggml-vocab-gpt-2.gguf");
  Oracle oracle(*model);
  check_random_graph(model, oracle, 41, Mode::LAZY, 80);
}

// ---------------------------------------------------------------------------------------------
// 2. Associativity

TEST(CacheText, ConcatenationIsAssociative) {
  auto model = tiny_model(bp::Arch::LLAMA);
  bp::Cache cache(model);
  const bp::Text a = cache.text("Once"), b = cache.text(" upon\n"), c = cache.text("\n a time");
  const bp::Text e = cache.text("");
  auto same = [](const bp::Text& x, const bp::Text& y) {
    EXPECT_EQ(x.tokens(), y.tokens());
    EXPECT_EQ(x.string(), y.string());
    EXPECT_EQ(x.segments(), y.segments());
  };
  same(a + (b + c), (a + b) + c);
  same(a + (e + c), (a + e) + c);
  same((a + " and ") + c, a + (" and " + c));
  same(("x" + a) + "y", "x" + (a + "y"));
  same(a + (b + (c + a)), ((a + b) + c) + a);
  EXPECT_EQ((a + (b + c)).segments(), (std::vector<std::string>{"Once", " upon\n", "\n a time"}));
  EXPECT_EQ((a + (b + c)).string(), "Once upon\n\n a time");

  // With a GPT-2 BPE vocabulary the seam-hostile pieces keep their per-segment tokens.
  auto gmodel = gpt2_vocab_model();
  if (!gmodel) return;
  bp::Cache gcache(gmodel);
  const bp::Text n1 = gcache.text("\n"), n2 = gcache.text("\n"), w = gcache.text(" world");
  EXPECT_EQ((n1 + (n2 + w)).tokens(), ((n1 + n2) + w).tokens());
  EXPECT_EQ((n1 + (n2 + w)).segments(), ((n1 + n2) + w).segments());
}

// ---------------------------------------------------------------------------------------------
// 3. Content addressing

TEST(CacheContent, JoinedPolicySharesEqualTokens) {
  auto model = tiny_model(bp::Arch::GPT2);
  Oracle oracle(*model);
  bp::CacheOptions opt;
  opt.policy = bp::TokenizePolicy::JOINED;
  bp::Cache cache(model, opt);
  const bp::Text ab = cache.text("ab");
  const std::vector<float> first = ab.next_logits();
  const bp::CacheStats s0 = cache.stats();
  EXPECT_EQ(s0.tokens_computed, 2u);
  const bp::Text a_b = cache.text("a") + "b";
  EXPECT_EQ(a_b.tokens(), ab.tokens());
  EXPECT_EQ(a_b.next_logits(), first);  // the same node's logits, bit for bit
  const bp::CacheStats s1 = cache.stats();
  EXPECT_EQ(s1.tokens_computed, s0.tokens_computed);
  EXPECT_EQ(s1.tokens_reused, s0.tokens_reused + 2);
  EXPECT_TRUE(logprobs_exact(a_b, oracle));
}

TEST(CacheContent, EqualTokensBuiltDifferentlyComputeOnce) {
  auto model = tiny_model(bp::Arch::LLAMA);
  Oracle oracle(*model);
  bp::Cache cache(model);
  const bp::Text x = (cache.text("Hello") + " there, ") + cache.text("general");
  EXPECT_TRUE(logprobs_exact(x, oracle));
  EXPECT_TRUE(next_logits_exact(x, oracle));
  const bp::CacheStats s0 = cache.stats();
  // Same segments, other objects, other nesting.
  const bp::Text y = cache.text("Hello") + (cache.text(" there, ") + "general");
  ASSERT_EQ(y.tokens(), x.tokens());
  EXPECT_TRUE(logprobs_exact(y, oracle));
  EXPECT_TRUE(next_logits_exact(y, oracle));
  // A token segment with the same ids (BOS comes from the cache, as for a string).
  std::vector<int32_t> ids = x.tokens();
  ASSERT_EQ(ids[0], model->tokenizer().bos());
  ids.erase(ids.begin());
  const bp::Text z = cache.tokens(ids);
  ASSERT_EQ(z.tokens(), x.tokens());
  EXPECT_TRUE(next_logits_exact(z, oracle));
  const bp::CacheStats s1 = cache.stats();
  EXPECT_EQ(s1.tokens_computed, s0.tokens_computed);
  EXPECT_EQ(s1.tokens_recomputed, s0.tokens_recomputed);
  EXPECT_EQ(s1.tokens_reused, s0.tokens_reused + 3 * x.n_tokens());  // y twice, z once

  // A prefix costs no K/V (only its logits, lost where the node is split); an extension only its tail.
  const bp::Text prefix = cache.text("Hello") + " there";
  EXPECT_TRUE(next_logits_exact(prefix, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s1.tokens_computed);
  const bp::Text longer = x + "!!";
  EXPECT_TRUE(logprobs_exact(longer, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s1.tokens_computed + 2);
}

TEST(CacheContent, Stories260KStringAndTokenSegmentsShare) {
  REQUIRE_MODEL(model, stories_model(), "stories260k/stories260K.gguf");
  Oracle oracle(*model);
  bp::Cache cache(model);
  const bp::Text s = cache.text("Once upon a time, there was a little girl.");
  EXPECT_TRUE(next_logits_exact(s, oracle));
  const uint64_t computed = cache.stats().tokens_computed;
  EXPECT_EQ(computed, s.n_tokens());
  bp::EncodeOptions eo;
  eo.add_bos = false;
  eo.add_space_prefix = true;
  const bp::Text t = cache.tokens(model->tokenizer().encode("Once upon a time, there was a little girl.", eo));
  ASSERT_EQ(t.tokens(), s.tokens());
  EXPECT_TRUE(next_logits_exact(t, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, computed);
}

// ---------------------------------------------------------------------------------------------
// 4. Tokenization policy

TEST(CacheTokenize, Gpt2NewlineSeam) {
  REQUIRE_MODEL(model, gpt2_vocab_model(), "ggml-vocab/ggml-vocab-gpt-2.gguf");
  Oracle oracle(*model);
  bp::Cache per_segment(model);
  const bp::Text nn = per_segment.text("\n") + "\n";
  EXPECT_EQ(nn.tokens(), (std::vector<int32_t>{198, 198}));
  EXPECT_EQ(per_segment.text("\n\n").tokens(), (std::vector<int32_t>{628}));
  const std::vector<bp::Seam> seams = nn.seam_report();
  ASSERT_EQ(seams.size(), 1u);
  EXPECT_EQ(seams[0].segment, 1u);
  EXPECT_EQ(seams[0].byte_offset, 1u);
  EXPECT_EQ(seams[0].segment_tokens, (std::vector<int32_t>{198, 198}));
  EXPECT_EQ(seams[0].joined_tokens, (std::vector<int32_t>{628}));
  EXPECT_TRUE(next_logits_exact(nn, oracle));
  EXPECT_TRUE(logprobs_exact(nn, oracle));

  // Seams that agree are not reported; the reported seam is found among others.
  EXPECT_TRUE((per_segment.text("Hello") + " world").seam_report().empty());
  const bp::Text longer = per_segment.text("Hello") + " world" + "\n" + "\n" + "bye";
  const std::vector<bp::Seam> s2 = longer.seam_report();
  ASSERT_EQ(s2.size(), 1u);
  EXPECT_EQ(s2[0].segment, 3u);
  EXPECT_EQ(s2[0].byte_offset, std::string("Hello world\n").size());

  bp::CacheOptions opt;
  opt.policy = bp::TokenizePolicy::JOINED;
  bp::Cache joined(model, opt);
  const bp::Text jnn = joined.text("\n") + "\n";
  EXPECT_EQ(jnn.tokens(), (std::vector<int32_t>{628}));
  EXPECT_EQ(jnn.seam_report().size(), 1u);
  EXPECT_TRUE(next_logits_exact(jnn, oracle));
}

TEST(CacheTokenize, Stories260KBosAndSpacePrefixOnce) {
  REQUIRE_MODEL(model, stories_model(), "stories260k/stories260K.gguf");
  const bp::Tokenizer& tok = model->tokenizer();
  ASSERT_TRUE(tok.add_bos());
  const std::string a = "Once upon a time", b = " there was a cat", c = "named Tom.";
  bp::EncodeOptions with_prefix, without_prefix;
  with_prefix.add_space_prefix = true;
  without_prefix.add_space_prefix = false;
  const std::vector<int32_t> ea = tok.encode(a, with_prefix), eb = tok.encode(b, without_prefix),
                             ec = tok.encode(c, without_prefix);
  ASSERT_NE(ea, tok.encode(a, without_prefix)) << "the \"▁\" prefix should change the first token";

  bp::Cache cache(model);
  std::vector<int32_t> want = {tok.bos()};
  want.insert(want.end(), ea.begin(), ea.end());
  want.insert(want.end(), eb.begin(), eb.end());
  EXPECT_EQ((cache.text(a) + b).tokens(), want);
  EXPECT_EQ((cache.text("") + a + "" + b).tokens(), want) << "empty segments change nothing";
  want.insert(want.end(), ec.begin(), ec.end());
  const bp::Text abc = cache.text(a) + b + c;
  EXPECT_EQ(abc.tokens(), want);
  const std::vector<int32_t> t2 = (abc + abc).tokens();
  EXPECT_EQ(std::count(t2.begin(), t2.end(), tok.bos()), 1) << "BOS once, at the start";
  EXPECT_EQ(t2[0], tok.bos());
  // A leading token segment takes the place of the prefix: the string after it gets none.
  const bp::Text tb = cache.tokens(ea) + b;
  std::vector<int32_t> want_tb = {tok.bos()};
  want_tb.insert(want_tb.end(), ea.begin(), ea.end());
  want_tb.insert(want_tb.end(), eb.begin(), eb.end());
  EXPECT_EQ(tb.tokens(), want_tb);

  bp::CacheOptions opt;
  opt.policy = bp::TokenizePolicy::JOINED;
  bp::Cache joined(model, opt);
  bp::EncodeOptions full;
  full.add_bos = true;
  EXPECT_EQ((joined.text(a) + b + c).tokens(), tok.encode(a + b + c, full));
  EXPECT_EQ((joined.text("") + a + b).tokens(), tok.encode(a + b, full));
}

// ---------------------------------------------------------------------------------------------
// 5. Splits

void check_split(bp::Arch arch) {
  auto model = tiny_model(arch);
  Oracle oracle(*model);
  bp::Cache cache(model);
  const int32_t V = model->config().n_vocab;
  const std::vector<int32_t> base = random_ids(V, 100, 5, 3);
  std::vector<int32_t> diverging(base.begin(), base.begin() + 50);
  std::vector<int32_t> other = random_ids(V, 30, 6, 3);
  if (other[0] == base[50]) other[0] = base[50] == 3 ? 4 : 3;
  diverging.insert(diverging.end(), other.begin(), other.end());
  const bp::Text t_long = cache.tokens(base);
  const bp::Text t_div = cache.tokens(diverging);
  const bp::Text t_prefix = cache.tokens(std::vector<int32_t>(base.begin(), base.begin() + 50));
  const uint64_t bos = model->tokenizer().add_bos() ? 1 : 0;

  EXPECT_TRUE(logprobs_exact(t_long, oracle));
  EXPECT_TRUE(next_logits_exact(t_long, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, 100 + bos);
  EXPECT_TRUE(next_logits_exact(t_div, oracle));  // splits the long node at 50 (+BOS)
  EXPECT_EQ(cache.stats().tokens_computed, 130 + bos);
  EXPECT_EQ(cache.stats().n_nodes, 3u);
  const bp::CacheStats s0 = cache.stats();
  EXPECT_TRUE(next_logits_exact(t_prefix, oracle));  // logits after the split point were never kept
  const bp::CacheStats s1 = cache.stats();
  EXPECT_EQ(s1.tokens_computed, s0.tokens_computed);
  EXPECT_GT(s1.tokens_recomputed, s0.tokens_recomputed);
  EXPECT_TRUE(logprobs_exact(t_div, oracle));
  EXPECT_TRUE(logprobs_exact(t_long, oracle));
  EXPECT_TRUE(next_logits_exact(t_long, oracle));
  EXPECT_TRUE(logprobs_exact(t_prefix, oracle));

  // A split inside the first node, then logprobs of the branch: the branch's first logprob needs
  // the logits at the split point, lost by the split.
  std::vector<int32_t> early(base.begin(), base.begin() + 20);
  early.push_back(base[20] == 3 ? 4 : 3);
  const bp::Text t_early = cache.tokens(early);
  EXPECT_TRUE(logprobs_exact(t_early, oracle));
  EXPECT_TRUE(next_logits_exact(cache.tokens(std::vector<int32_t>(base.begin(), base.begin() + 20)), oracle));
  EXPECT_TRUE(logprobs_exact(t_long, oracle, 15));
  EXPECT_EQ(cache.stats().tokens_computed, s1.tokens_computed + 1);
  EXPECT_EQ(cache.stats().evictions, 0u);
}

TEST(CacheSplit, Gpt2Tiny) { check_split(bp::Arch::GPT2); }
TEST(CacheSplit, LlamaTiny) { check_split(bp::Arch::LLAMA); }

TEST(CacheSplit, BatchWithDivergingTexts) {
  // In one eval: a text, its prefix, and branches off its middle, all pending together.
  auto model = tiny_model(bp::Arch::GPT2);
  Oracle oracle(*model);
  bp::Cache cache(model);
  const bp::Text stem = cache.text("the quick brown fox jumps over the lazy dog");
  std::vector<bp::Text> texts = {stem, cache.text("the quick brown"), cache.text("the quick brown cat"),
                                 cache.text("the quick") + " red fox", stem + " again", cache.text("t")};
  bp::EvalOptions eo;
  eo.logprobs = true;
  cache.eval(texts, eo);
  std::vector<std::vector<int32_t>> toks;
  for (const bp::Text& t : texts) toks.push_back(t.tokens());
  EXPECT_EQ(cache.stats().tokens_computed, distinct_prefixes(toks));
  const bp::CacheStats s0 = cache.stats();
  for (const bp::Text& t : texts) {
    EXPECT_TRUE(next_logits_exact(t, oracle));
    EXPECT_TRUE(logprobs_exact(t, oracle));
  }
  EXPECT_EQ(cache.stats().tokens_computed, s0.tokens_computed);
  EXPECT_EQ(cache.stats().forward_calls, s0.forward_calls);
}

// ---------------------------------------------------------------------------------------------
// 6. Pins

TEST(CachePin, PinnedTextSurvivesBudgetSqueeze) {
  auto model = tiny_model(bp::Arch::GPT2);
  Oracle oracle(*model);
  bp::CacheOptions opt;
  opt.memory_budget = 3 * worst_case_bytes(*model, 60);
  bp::Cache cache(model, opt);
  const int32_t V = model->config().n_vocab;
  const std::vector<int32_t> pinned_ids = random_ids(V, 60, 100);
  const bp::Text pinned = cache.tokens(pinned_ids);
  pinned.pin();
  const uint64_t pinned_cost = cache.stats().tokens_computed;
  EXPECT_EQ(pinned_cost, 60u);

  auto squeeze = [&](uint32_t seed) {
    for (uint32_t i = 0; i < 10; ++i) {
      std::vector<int32_t> ids = random_ids(V, 60, seed + i);
      if (ids[0] == pinned_ids[0]) ids[0] = (ids[0] + 1) % V;  // no shared prefix with the pinned text
      EXPECT_TRUE(next_logits_exact(cache.tokens(ids), oracle));
      EXPECT_LE(cache.stats().bytes, opt.memory_budget);
    }
  };
  squeeze(200);
  EXPECT_GT(cache.stats().evictions, 0u);
  const bp::CacheStats s0 = cache.stats();
  EXPECT_TRUE(next_logits_exact(pinned, oracle));
  const bp::CacheStats s1 = cache.stats();
  EXPECT_EQ(s1.tokens_computed, s0.tokens_computed) << "pinned nodes must not be evicted";
  EXPECT_EQ(s1.tokens_recomputed, s0.tokens_recomputed);
  EXPECT_EQ(s1.tokens_reused, s0.tokens_reused + 60);

  // Pins are counted: two pins need two unpins.
  pinned.pin();
  pinned.unpin();
  squeeze(300);
  const bp::CacheStats s2 = cache.stats();
  EXPECT_TRUE(next_logits_exact(pinned, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s2.tokens_computed) << "still pinned once";

  pinned.unpin();
  squeeze(400);
  const bp::CacheStats s3 = cache.stats();
  EXPECT_TRUE(next_logits_exact(pinned, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s3.tokens_computed + 60) << "unpinned: evicted and recomputed";

  EXPECT_TRUE(throws_code([&] { pinned.unpin(); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(throws_code([&] { cache.text("never pinned").unpin(); }, bp::ErrorCode::INVALID_ARGUMENT));
}

TEST(CachePin, PinnedPrefixOfLaterTexts) {
  // A pinned prefix shared by later texts, split by them, still survives and stays exact.
  auto model = tiny_model(bp::Arch::LLAMA);
  Oracle oracle(*model);
  bp::CacheOptions opt;
  opt.memory_budget = 2 * worst_case_bytes(*model, 70);
  bp::Cache cache(model, opt);
  const bp::Text system = cache.text("You are a helpful assistant. Answer briefly.");
  system.pin();
  for (int i = 0; i < 12; ++i) {
    const bp::Text q = system + (" Question " + std::to_string(i) + ": what is " + std::to_string(i * 7) + "?");
    EXPECT_TRUE(logprobs_exact(q, oracle));
    EXPECT_LE(cache.stats().bytes, opt.memory_budget);
    // A branch off the middle of the pinned prefix.
    EXPECT_TRUE(next_logits_exact(cache.text("You are a helpful ") + std::to_string(i), oracle));
  }
  const bp::CacheStats s0 = cache.stats();
  EXPECT_TRUE(logprobs_exact(system, oracle));
  EXPECT_TRUE(next_logits_exact(system, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s0.tokens_computed);
  system.unpin();
  EXPECT_TRUE(throws_code([&] { system.unpin(); }, bp::ErrorCode::INVALID_ARGUMENT));
}

// ---------------------------------------------------------------------------------------------
// Eviction order and the budget

TEST(CacheBudget, LeastRecentlyUsedEvictedFirst) {
  auto model = tiny_model(bp::Arch::GPT2);
  Oracle oracle(*model);
  const bp::ModelConfig& c = model->config();
  // One 30-token text: K/V, next logits, and room for its logprobs (an evaluation may reserve it).
  const uint64_t one_text = 30ull * (2 * c.n_layer * c.kv_dim() + 1) * sizeof(float) + static_cast<uint64_t>(c.n_vocab) * sizeof(float);
  bp::CacheOptions opt;
  opt.memory_budget = 3 * one_text + 100;  // three such texts, not four
  bp::Cache cache(model, opt);
  const bp::Text a = cache.text(std::string(30, 'a')), b = cache.text(std::string(30, 'b')),
                 cc = cache.text(std::string(30, 'c')), d = cache.text(std::string(30, 'd'));
  for (const bp::Text* t : {&a, &b, &cc}) EXPECT_TRUE(next_logits_exact(*t, oracle));
  EXPECT_EQ(cache.stats().evictions, 0u);
  EXPECT_TRUE(next_logits_exact(a, oracle));  // a is now the most recently used
  EXPECT_TRUE(next_logits_exact(d, oracle));  // evicts b, the least recently used
  EXPECT_EQ(cache.stats().evictions, 1u);
  EXPECT_LE(cache.stats().bytes, opt.memory_budget);
  const bp::CacheStats s0 = cache.stats();
  EXPECT_TRUE(next_logits_exact(a, oracle));
  EXPECT_TRUE(next_logits_exact(d, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s0.tokens_computed);
  EXPECT_TRUE(next_logits_exact(b, oracle));  // recomputed, evicting cc
  EXPECT_EQ(cache.stats().tokens_computed, s0.tokens_computed + 30);
  EXPECT_EQ(cache.stats().evictions, 2u);
}

TEST(CacheBudget, LogitsRecomputedAfterSplitCountAgainstBudget) {
  // Everything held is pinned and the budget is just what it holds: the logits lost by a split
  // cannot be brought back without going over, so the text ending at the split point must fail
  // with OUT_OF_MEMORY (or fit by eviction), never leave the cache over its budget.
  auto model = tiny_model(bp::Arch::GPT2);
  Oracle oracle(*model);
  const int32_t V = model->config().n_vocab;
  const std::vector<int32_t> base = random_ids(V, 40, 9);
  std::vector<int32_t> branch(base.begin(), base.begin() + 20);
  branch.push_back(base[20] == 0 ? 1 : 0);
  const std::vector<int32_t> prefix(base.begin(), base.begin() + 20);

  uint64_t held = 0;  // bytes of the pinned texts, measured with an ample budget
  {
    bp::Cache probe(model);
    probe.tokens(base).pin();
    probe.tokens(branch).pin();
    held = probe.stats().bytes;
  }
  bp::CacheOptions opt;
  opt.memory_budget = held + 16;
  bp::Cache cache(model, opt);
  const bp::Text t_base = cache.tokens(base), t_branch = cache.tokens(branch), t_prefix = cache.tokens(prefix);
  t_base.pin();
  t_branch.pin();
  ASSERT_EQ(cache.stats().bytes, held);
  try {
    EXPECT_TRUE(next_logits_exact(t_prefix, oracle));
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::OUT_OF_MEMORY) << e.what();
  }
  EXPECT_LE(cache.stats().bytes, opt.memory_budget);
  // The same for a branch's first logprob, which needs the logits at its split point.
  std::vector<int32_t> branch2(base.begin(), base.begin() + 10);
  branch2.push_back(base[10] == 0 ? 1 : 0);
  try {
    EXPECT_TRUE(logprobs_exact(cache.tokens(branch2), oracle));
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::OUT_OF_MEMORY) << e.what();
  }
  EXPECT_LE(cache.stats().bytes, opt.memory_budget);
  // Unpinned, there is room again and everything is exact.
  t_base.unpin();
  t_branch.unpin();
  EXPECT_TRUE(next_logits_exact(t_prefix, oracle));
  EXPECT_TRUE(logprobs_exact(t_branch, oracle));
  EXPECT_LE(cache.stats().bytes, opt.memory_budget);
}

// ---------------------------------------------------------------------------------------------
// 7. Generation

void check_generate(const std::shared_ptr<bp::Model>& model, const bp::Text& prompt, bp::Cache& cache, int32_t n) {
  Oracle oracle(*model);
  const std::vector<int32_t> prompt_tokens = prompt.tokens();
  const bp::Text g = prompt.generate(n);
  EXPECT_EQ(g.string().substr(0, prompt.string().size()), prompt.string());
  const std::vector<int32_t> toks = g.tokens();
  ASSERT_GE(toks.size(), prompt_tokens.size());
  ASSERT_TRUE(std::equal(prompt_tokens.begin(), prompt_tokens.end(), toks.begin()));
  const std::vector<int32_t> gen(toks.begin() + static_cast<ptrdiff_t>(prompt_tokens.size()), toks.end());
  EXPECT_EQ(gen, greedy_reference(*model, prompt_tokens, n));
  EXPECT_EQ(g.segments().size(), prompt.segments().size() + 1);
  EXPECT_EQ(g.segments().back(), model->tokenizer().decode(gen));

  const bp::CacheStats s0 = cache.stats();
  EXPECT_TRUE(next_logits_exact(g, oracle));
  EXPECT_TRUE(logprobs_exact(g, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s0.tokens_computed) << "generated tokens are in the cache";

  // Generating again gives the same text; continuing the continuation extends it.
  EXPECT_EQ(prompt.generate(n).tokens(), toks);
  const bp::Text g2 = g.generate(5);
  const std::vector<int32_t> t2 = g2.tokens();
  ASSERT_GE(t2.size(), toks.size());
  const std::vector<int32_t> gen2(t2.begin() + static_cast<ptrdiff_t>(toks.size()), t2.end());
  EXPECT_EQ(gen2, greedy_reference(*model, toks, 5));
  EXPECT_TRUE(logprobs_exact(g2, oracle));
  // A shorter generation is a prefix of the longer one, and exact.
  const bp::Text g_short = prompt.generate(n / 2);
  EXPECT_TRUE(next_logits_exact(g_short, oracle));
  EXPECT_TRUE(logprobs_exact(g_short, oracle));
}

TEST(CacheGenerate, GreedyGpt2Tiny) {
  auto model = tiny_model(bp::Arch::GPT2);
  bp::Cache cache(model);
  check_generate(model, cache.text("Once upon") + " a time", cache, 24);
}

TEST(CacheGenerate, GreedyLlamaTinySmallBatches) {
  auto model = tiny_model(bp::Arch::LLAMA);
  bp::CacheOptions opt;
  opt.max_batch_tokens = 3;
  bp::Cache cache(model, opt);
  check_generate(model, cache.text("Once upon") + " a time", cache, 24);
}

TEST(CacheGenerate, GreedyStories260K) {
  REQUIRE_MODEL(model, stories_model(), "stories260k/stories260K.gguf");
  bp::Cache cache(model);
  check_generate(model, cache.text("Once upon a time,") + " there was a", cache, 40);
}

// ---------------------------------------------------------------------------------------------
// 8. Errors

TEST(CacheErrors, TextWithoutTokens) {
  auto model = tiny_model(bp::Arch::GPT2);
  ASSERT_FALSE(model->tokenizer().add_bos());
  bp::Cache cache(model);
  const bp::Text empty = cache.text("");
  EXPECT_TRUE(empty.tokens().empty());
  EXPECT_TRUE(throws_code([&] { empty.next_logits(); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(throws_code([&] { (empty + "").next_logits(); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(empty.logprobs().empty());
  EXPECT_NO_THROW(cache.eval(std::vector<bp::Text>{empty}));
  EXPECT_EQ(cache.stats().tokens_computed, 0u);
  EXPECT_TRUE(throws_code([] { bp::Text().next_logits(); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(throws_code([] { bp::Text().tokens(); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(throws_code([&] { cache.tokens({model->config().n_vocab}); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(throws_code([&] { cache.tokens({-1}); }, bp::ErrorCode::INVALID_ARGUMENT));
  // A text of one token has logits but no logprob.
  Oracle oracle(*model);
  EXPECT_TRUE(next_logits_exact(cache.text("a"), oracle));
  EXPECT_TRUE(cache.text("a").logprobs().empty());
}

TEST(CacheErrors, BudgetTooSmallForOneText) {
  auto model = tiny_model(bp::Arch::GPT2);
  Oracle oracle(*model);
  const bp::ModelConfig& c = model->config();
  const uint64_t kv_token = 2ull * c.n_layer * c.kv_dim() * sizeof(float) + sizeof(float);
  const uint64_t logits_row = static_cast<uint64_t>(c.n_vocab) * sizeof(float);
  bp::CacheOptions opt;
  opt.memory_budget = 20 * kv_token + 3 * logits_row;
  bp::Cache cache(model, opt);

  const bp::Text big = cache.text(std::string(100, 'z'));
  EXPECT_TRUE(throws_code([&] { big.next_logits(); }, bp::ErrorCode::OUT_OF_MEMORY));
  EXPECT_EQ(cache.stats().bytes, 0u);
  EXPECT_EQ(cache.stats().n_nodes, 0u) << "an abandoned evaluation leaves no pending nodes";

  const bp::Text small = cache.text("hi there");
  EXPECT_TRUE(next_logits_exact(small, oracle));
  EXPECT_TRUE(logprobs_exact(small, oracle));
  EXPECT_TRUE(throws_code([&] { big.logprobs(); }, bp::ErrorCode::OUT_OF_MEMORY));
  EXPECT_TRUE(throws_code([&] { cache.eval(std::vector<bp::Text>{cache.text("ok"), big}); }, bp::ErrorCode::OUT_OF_MEMORY));
  EXPECT_LE(cache.stats().bytes, opt.memory_budget);
  // Still usable and exact; texts that only fit one at a time are evaluated in turns.
  const bp::CacheStats s0 = cache.stats();
  EXPECT_TRUE(next_logits_exact(small, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s0.tokens_computed) << "the small text stayed cached";
  std::vector<bp::Text> several;
  for (int i = 0; i < 5; ++i) several.push_back(cache.text(std::to_string(i) + " little words"));
  bp::EvalOptions eo;
  eo.logprobs = true;
  EXPECT_NO_THROW(cache.eval(several, eo));
  EXPECT_LE(cache.stats().bytes, opt.memory_budget);
  for (const bp::Text& t : several) {
    EXPECT_TRUE(next_logits_exact(t, oracle));
    EXPECT_TRUE(logprobs_exact(t, oracle));
    EXPECT_LE(cache.stats().bytes, opt.memory_budget);
  }
  EXPECT_GT(cache.stats().evictions, 0u);

  // Next to a pinned text, a text that would fit alone does not; unpinned, it does.
  const bp::Text pinned = cache.text("pinned text!");
  pinned.pin();
  const bp::Text medium = cache.text("a medium-sized one");  // 18 tokens: fits only alone
  EXPECT_TRUE(throws_code([&] { medium.next_logits(); }, bp::ErrorCode::OUT_OF_MEMORY));
  pinned.unpin();
  EXPECT_TRUE(next_logits_exact(medium, oracle));
  EXPECT_LE(cache.stats().bytes, opt.memory_budget);
}

TEST(CacheErrors, TextsOfDifferentCaches) {
  auto model = tiny_model(bp::Arch::GPT2);
  bp::Cache c1(model), c2(model);
  const bp::Text a = c1.text("a"), b = c2.text("b");
  EXPECT_TRUE(throws_code([&] { (void)(a + b); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(throws_code([&] { c1.eval(std::vector<bp::Text>{a, b}); }, bp::ErrorCode::INVALID_ARGUMENT));
  EXPECT_TRUE(throws_code([&] { (void)c1.to_dot(std::vector<bp::Text>{b}); }, bp::ErrorCode::INVALID_ARGUMENT));
  // A default Text joins any cache's text.
  EXPECT_EQ((bp::Text() + a).tokens(), a.tokens());
  EXPECT_EQ((b + bp::Text()).string(), "b");
}

TEST(CacheErrors, TextOutlivesItsCache) {
  auto model = tiny_model(bp::Arch::LLAMA);
  Oracle oracle(*model);
  bp::Text t;
  {
    bp::Cache cache(model);
    t = cache.text("kept alive") + " by its texts";
  }
  EXPECT_TRUE(next_logits_exact(t, oracle));
  EXPECT_TRUE(logprobs_exact(t, oracle));
}

// ---------------------------------------------------------------------------------------------
// 9. Eager texts

TEST(CacheEager, BuildingComputes) {
  auto model = tiny_model(bp::Arch::GPT2);
  Oracle oracle(*model);
  bp::CacheOptions opt;
  opt.eager = true;
  bp::Cache cache(model, opt);
  const bp::Text hello = cache.text("hello");
  EXPECT_EQ(cache.stats().tokens_computed, 5u);
  const bp::Text hw = hello + " world";
  EXPECT_EQ(cache.stats().tokens_computed, 11u);
  const bp::Text say = "say " + hello;
  EXPECT_EQ(cache.stats().tokens_computed, 20u);
  const bp::Text ids = cache.tokens({1, 2, 3});
  EXPECT_EQ(cache.stats().tokens_computed, 23u);
  const bp::CacheStats s0 = cache.stats();
  EXPECT_TRUE(next_logits_exact(hw, oracle));
  EXPECT_TRUE(next_logits_exact(say, oracle));
  EXPECT_EQ(cache.stats().tokens_computed, s0.tokens_computed);
  EXPECT_EQ(cache.stats().forward_calls, s0.forward_calls);
  // A text with no tokens has nothing to compute: building it is no error.
  EXPECT_NO_THROW(cache.text(""));
  EXPECT_NO_THROW((void)(cache.text("") + ""));
}

// ---------------------------------------------------------------------------------------------
// Threads: outputs read from several threads are served one at a time, and exact.

TEST(CacheThreads, ConcurrentReaders) {
  auto model = tiny_model(bp::Arch::LLAMA);
  Oracle oracle(*model);
  bp::Cache cache(model);
  const bp::Text base = cache.text("A shared beginning, ");
  std::vector<bp::Text> texts;
  for (int i = 0; i < 8; ++i) texts.push_back(base + ("then branch " + std::to_string(i)));
  std::vector<std::vector<float>> got(texts.size());
  std::vector<std::thread> threads;
  for (int w = 0; w < 2; ++w)
    threads.emplace_back([&, w] {
      for (size_t i = static_cast<size_t>(w); i < texts.size(); i += 2) got[i] = texts[i].next_logits();
    });
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < texts.size(); ++i) {
    const Reference& ref = oracle.get(texts[i].tokens());
    ASSERT_EQ(got[i].size(), ref.last_logits.size());
    const auto c = compare_logits(got[i].data(), ref.last_logits.data(), static_cast<int64_t>(got[i].size()));
    EXPECT_TRUE(c.within_tolerance() && c.same_argmax) << "text " << i;
  }
}
