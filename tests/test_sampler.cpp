// Sampler: greedy, temperature, top-k, top-p, the llama2.c random stream, reproducibility.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "backprompt/error.h"
#include "model/sampler.h"

namespace bp = backprompt;

namespace {

bp::Sampler make_sampler(float temperature, int32_t top_k = 0, float top_p = 1.0f, uint64_t seed = 42) {
  bp::SamplingParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return bp::Sampler(p);
}

std::vector<float> log_probs(const std::vector<float>& probs) {
  std::vector<float> out;
  for (float p : probs) out.push_back(std::log(p));
  return out;
}

// Frequencies of each id over n draws.
std::vector<double> histogram(bp::Sampler& s, const std::vector<float>& logits, int n) {
  std::vector<double> freq(logits.size(), 0.0);
  for (int i = 0; i < n; i++) freq[s.sample(logits)] += 1.0 / n;
  return freq;
}

}  // namespace

TEST(SamplerGreedy, ArgmaxAndLowestIdOnTies) {
  auto s = make_sampler(0.0f);
  EXPECT_EQ(s.sample(std::vector<float>{0.1f, 3.0f, -2.0f, 2.9f}), 1);
  EXPECT_EQ(s.sample(std::vector<float>{1.0f, 5.0f, 5.0f, 5.0f}), 1);
  EXPECT_EQ(s.sample(std::vector<float>{-INFINITY, -1.0f, -1.0f}), 1);
  EXPECT_EQ(s.sample(std::vector<float>{7.0f}), 0);
}

// argmax against its definition, on vectors with many ties and with NaNs anywhere (first too).
TEST(SamplerGreedy, ArgmaxIsTheLowestIdOfTheLargestNumber) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 500; trial++) {
    std::vector<float> v(1 + rng() % 40);
    for (float& x : v) x = static_cast<float>(static_cast<int>(rng() % 7) - 3);  // few values: ties
    const int n_nan = trial % 3 == 0 ? 0 : static_cast<int>(rng() % v.size());
    for (int i = 0; i < n_nan; i++) v[rng() % v.size()] = NAN;
    int32_t want = -1;
    for (size_t i = 0; i < v.size(); i++) {
      if (!std::isnan(v[i]) && (want < 0 || v[i] > v[static_cast<size_t>(want)])) want = static_cast<int32_t>(i);
    }
    if (want < 0) want = static_cast<int32_t>(v.size()) - 1;  // all NaN: the last one
    EXPECT_EQ(bp::argmax(v), want) << "trial " << trial;
  }
  EXPECT_EQ(bp::argmax(std::vector<float>{}), 0);
}

TEST(SamplerGreedy, DoesNotConsumeRandomness) {
  auto s = make_sampler(0.0f, 0, 1.0f, 1234);
  for (int i = 0; i < 10; i++) s.sample(std::vector<float>{0.0f, 1.0f});
  EXPECT_EQ(s.rng_state(), 1234u);
}

TEST(SamplerRng, MatchesLlama2cXorshift) {
  // llama2.c with seed 42: the first three u32 are 1456360119, 3359763283, 3393612768, i.e.
  // coins 0.339, 0.782, 0.790; on four equal logits the cdf walk picks 1, 3, 3.
  auto s = make_sampler(1.0f, 0, 1.0f, 42);
  std::vector<float> flat(4, 0.0f);
  EXPECT_EQ(s.sample(flat), 1);
  EXPECT_EQ(s.rng_state(), 1409286176u);
  EXPECT_EQ(s.sample(flat), 3);
  EXPECT_EQ(s.rng_state(), 47299340976525346u);
  EXPECT_EQ(s.sample(flat), 3);
  EXPECT_EQ(s.rng_state(), 142435135655313518u);
}

TEST(SamplerRng, ZeroSeedStillRandom) {
  auto s = make_sampler(1.0f, 0, 1.0f, 0);
  std::set<int32_t> seen;
  std::vector<float> flat(8, 0.0f);
  for (int i = 0; i < 200; i++) seen.insert(s.sample(flat));
  EXPECT_GT(seen.size(), 4u);
}

TEST(SamplerReproducible, SameSeedSameStream) {
  std::vector<float> logits = {0.5f, 1.0f, 0.2f, -0.3f, 0.9f, 0.0f, 1.1f, 0.4f};
  for (float top_p : {1.0f, 0.9f}) {
    for (int32_t top_k : {0, 3}) {
      auto a = make_sampler(0.8f, top_k, top_p, 7);
      auto b = make_sampler(0.8f, top_k, top_p, 7);
      auto c = make_sampler(0.8f, top_k, top_p, 8);
      std::vector<int32_t> ra, rb, rc;
      for (int i = 0; i < 100; i++) {
        ra.push_back(a.sample(logits));
        rb.push_back(b.sample(logits));
        rc.push_back(c.sample(logits));
      }
      EXPECT_EQ(ra, rb);
      EXPECT_NE(ra, rc);
    }
  }
}

TEST(SamplerReproducible, CopyAndResumeContinueTheStream) {
  std::vector<float> logits = {0.5f, 1.0f, 0.2f, -0.3f, 0.9f};
  auto a = make_sampler(1.0f, 0, 1.0f, 99);
  for (int i = 0; i < 5; i++) a.sample(logits);
  bp::Sampler copy = a;
  auto resumed = make_sampler(1.0f, 0, 1.0f, 1);
  resumed.set_rng_state(a.rng_state());
  for (int i = 0; i < 50; i++) {
    int32_t next = a.sample(logits);
    EXPECT_EQ(copy.sample(logits), next);
    EXPECT_EQ(resumed.sample(logits), next);
  }
}

TEST(SamplerDistribution, MatchesSoftmax) {
  std::vector<float> probs = {0.1f, 0.2f, 0.3f, 0.4f};
  auto s = make_sampler(1.0f, 0, 1.0f, 2024);
  auto freq = histogram(s, log_probs(probs), 40000);
  for (size_t i = 0; i < probs.size(); i++) EXPECT_NEAR(freq[i], probs[i], 0.01) << "id " << i;
}

TEST(SamplerDistribution, TemperatureScalesLogits) {
  // At temperature 2, p_i is proportional to sqrt(q_i).
  std::vector<float> q = {0.04f, 0.16f, 0.36f, 0.44f};
  auto s = make_sampler(2.0f, 0, 1.0f, 5);
  auto freq = histogram(s, log_probs(q), 40000);
  double z = 0;
  for (float v : q) z += std::sqrt(v);
  for (size_t i = 0; i < q.size(); i++) EXPECT_NEAR(freq[i], std::sqrt(q[i]) / z, 0.01) << "id " << i;

  // A tiny temperature is practically greedy.
  auto cold = make_sampler(0.01f, 0, 1.0f, 5);
  for (int i = 0; i < 100; i++) EXPECT_EQ(cold.sample(log_probs(q)), 3);
}

TEST(SamplerTopK, KeepsOnlyTheKLargest) {
  std::vector<float> probs = {0.05f, 0.3f, 0.1f, 0.25f, 0.2f, 0.1f};
  auto s = make_sampler(1.0f, 3, 1.0f, 11);
  auto freq = histogram(s, log_probs(probs), 30000);
  // Kept: ids 1, 3, 4 (0.3, 0.25, 0.2), renormalised by 0.75.
  EXPECT_EQ(freq[0] + freq[2] + freq[5], 0.0);
  EXPECT_NEAR(freq[1], 0.3 / 0.75, 0.015);
  EXPECT_NEAR(freq[3], 0.25 / 0.75, 0.015);
  EXPECT_NEAR(freq[4], 0.2 / 0.75, 0.015);
}

TEST(SamplerTopK, OneIsGreedyAndTiesKeepLowerIds) {
  auto s = make_sampler(1.5f, 1, 1.0f, 3);
  for (int i = 0; i < 50; i++) EXPECT_EQ(s.sample(std::vector<float>{0.0f, 2.0f, 1.0f, 2.0f}), 1);
  auto two = make_sampler(1.0f, 2, 1.0f, 3);
  for (int i = 0; i < 200; i++) EXPECT_NE(two.sample(std::vector<float>{3.0f, 1.0f, 3.0f, 3.0f}), 3);
}

TEST(SamplerTopK, LargerThanVocabIsOff) {
  std::vector<float> logits = {0.1f, 0.4f, -0.2f};
  auto a = make_sampler(1.0f, 100, 1.0f, 9);
  auto b = make_sampler(1.0f, 0, 1.0f, 9);
  for (int i = 0; i < 100; i++) EXPECT_EQ(a.sample(logits), b.sample(logits));
}

TEST(SamplerTopP, KeepsTheNucleus) {
  // Sorted probabilities 0.5, 0.3, 0.15, 0.05: the cumulative sum first exceeds 0.7 at the
  // second, so only ids 2 and 0 are drawn, in proportion 0.5 : 0.3.
  std::vector<float> probs = {0.3f, 0.05f, 0.5f, 0.15f};
  auto s = make_sampler(1.0f, 0, 0.7f, 17);
  auto freq = histogram(s, log_probs(probs), 30000);
  EXPECT_EQ(freq[1] + freq[3], 0.0);
  EXPECT_NEAR(freq[2], 0.5 / 0.8, 0.015);
  EXPECT_NEAR(freq[0], 0.3 / 0.8, 0.015);
}

TEST(SamplerTopP, SmallTopPIsGreedy) {
  std::vector<float> probs = {0.3f, 0.05f, 0.5f, 0.15f};
  auto s = make_sampler(1.0f, 0, 0.01f, 17);
  for (int i = 0; i < 100; i++) EXPECT_EQ(s.sample(log_probs(probs)), 2);
}

TEST(SamplerTopP, CombinesWithTopK) {
  // top-k 3 leaves 0.5, 0.3, 0.15 (renormalised 0.526, 0.316, 0.158); top-p 0.8 then cuts
  // after the second.
  std::vector<float> probs = {0.3f, 0.05f, 0.5f, 0.15f};
  auto s = make_sampler(1.0f, 3, 0.8f, 23);
  auto freq = histogram(s, log_probs(probs), 30000);
  EXPECT_EQ(freq[1] + freq[3], 0.0);
  EXPECT_NEAR(freq[2], 0.5 / 0.8, 0.015);
}

TEST(SamplerParams, InvalidValuesThrow) {
  EXPECT_THROW(make_sampler(-1.0f), bp::Error);
  EXPECT_THROW(make_sampler(NAN), bp::Error);
  EXPECT_THROW(make_sampler(1.0f, -1), bp::Error);
  EXPECT_THROW(make_sampler(1.0f, 0, 0.0f), bp::Error);
  auto s = make_sampler(1.0f);
  EXPECT_THROW(s.sample(std::vector<float>{}), bp::Error);
}
