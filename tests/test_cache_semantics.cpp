// The lazy KV cache's semantics, each against the uncached reference path: splits that lose
// logits, pins, the memory budget, generation into the tree, errors, eager texts, threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "backprompt/model.h"
#include "backprompt/text.h"
#include "cache_test_util.h"

using namespace cache_test;  // NOLINT: the shared helpers of the cache tests
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
