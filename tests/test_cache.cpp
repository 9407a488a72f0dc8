// The lazy KV cache against the uncached reference path (one Sequence pass over text.tokens()):
// random concatenation graphs evaluated lazily, batched, under a budget that forces evictions,
// and in tiny forward chunks; associativity; content addressing; tokenization policies and seams.
// (Splits, pins, budget, generation, errors and eager texts: test_cache_semantics.cpp.)
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
