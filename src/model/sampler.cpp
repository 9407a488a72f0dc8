// Token sampling. With top_k off, this is llama2.c's sampler step for step (same RNG, same
// float32 softmax, same cumulative walks), so seeded runs reproduce llama2.c's outputs.
#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "backprompt/error.h"

namespace backprompt {

namespace {

// llama2.c's generator: xorshift64*, the high 32 bits of the product.
uint32_t random_u32(uint64_t& state) {
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return static_cast<uint32_t>((state * 0x2545F4914F6CDD1DULL) >> 32);
}

// A float in [0, 1) from the top 24 bits.
float random_f32(uint64_t& state) {
  return static_cast<float>(random_u32(state) >> 8) / 16777216.0f;
}

// Marks all but the k largest logits (ties -> lower id kept) as excluded.
void keep_top_k(std::span<const float> logits, int32_t k, std::vector<char>& keep) {  // keep: [n]
  const size_t n = logits.size();
  std::vector<int32_t> order(n);  // [n] token ids
  for (size_t i = 0; i < n; i++) order[i] = static_cast<int32_t>(i);
  auto greater = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), greater);
  std::fill(keep.begin(), keep.end(), 0);
  for (int32_t i = 0; i < k; i++) keep[order[i]] = 1;
}

// Softmax in place over the kept entries, in float32 and in llama2.c's order of operations;
// excluded entries become 0.
void softmax(std::vector<float>& x, const std::vector<char>& keep) {  // x: [n]
  float max_val = -INFINITY;
  for (size_t i = 0; i < x.size(); i++) {
    if (keep[i] && x[i] > max_val) max_val = x[i];
  }
  float sum = 0.0f;
  for (size_t i = 0; i < x.size(); i++) {
    x[i] = keep[i] ? std::exp(x[i] - max_val) : 0.0f;
    sum += x[i];
  }
  for (float& p : x) p /= sum;
}

// Walks the cdf until the coin falls under it. A coin past the total (rounding) takes the last
// token with non-zero probability.
int32_t sample_multinomial(const std::vector<float>& probs, float coin) {  // probs: [n]
  float cdf = 0.0f;
  int32_t last = static_cast<int32_t>(probs.size()) - 1;
  for (size_t i = 0; i < probs.size(); i++) {
    if (probs[i] <= 0.0f) continue;
    cdf += probs[i];
    last = static_cast<int32_t>(i);
    if (coin < cdf) return last;
  }
  return last;
}

// Nucleus sampling as llama2.c does it: drop tokens that cannot be in the nucleus (prob below
// (1 - top_p) / (n - 1)), sort the rest by probability, cut where the cumulative probability
// first exceeds top_p, and walk that truncated distribution scaled by its total.
int32_t sample_top_p(const std::vector<float>& probs, float top_p, float coin) {  // probs: [n]
  const size_t n = probs.size();
  const float cutoff = (1.0f - top_p) / static_cast<float>(n - 1);
  struct Candidate { float prob; int32_t id; };
  std::vector<Candidate> cand;  // [n0] kept tokens
  for (size_t i = 0; i < n; i++) {
    if (probs[i] >= cutoff && probs[i] > 0.0f) cand.push_back({probs[i], static_cast<int32_t>(i)});
  }
  if (cand.empty()) {  // only when top_p < 1/n and the distribution is flat: take the likeliest
    return static_cast<int32_t>(std::max_element(probs.begin(), probs.end()) - probs.begin());
  }
  // Descending probability; equal probabilities keep id order (llama2.c's qsort leaves their
  // order to the C library; glibc's merge sort also keeps id order).
  std::stable_sort(cand.begin(), cand.end(),
                   [](const Candidate& a, const Candidate& b) { return a.prob > b.prob; });
  float cumulative = 0.0f;
  size_t last = cand.size() - 1;
  for (size_t i = 0; i < cand.size(); i++) {
    cumulative += cand[i].prob;
    if (cumulative > top_p) {
      last = i;
      break;
    }
  }
  const float r = coin * cumulative;
  float cdf = 0.0f;
  for (size_t i = 0; i <= last; i++) {
    cdf += cand[i].prob;
    if (r < cdf) return cand[i].id;
  }
  return cand[last].id;
}

}  // namespace

// The running maximum stays in a register. Compared against logits[best] instead, every step
// waits on a load that depends on the last: on 32000 logits (a 2-core AVX-512 VM) this loop takes
// 13 us, that one 20 us and std::max_element 119 us, which was 3-4% of a llama-110m q8_0 decode
// step in `backprompt bench`.
int32_t argmax(std::span<const float> logits) {
  int32_t best = 0;
  float top = logits.empty() ? 0.0f : logits[0];
  for (size_t i = 1; i < logits.size(); i++) {
    if (logits[i] > top || std::isnan(top)) {
      top = logits[i];
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

Sampler::Sampler(const SamplingParams& params) : params_(params) {
  if (!(params.temperature >= 0.0f) || std::isinf(params.temperature)) {
    throw Error(ErrorCode::INVALID_ARGUMENT,
                "sampler: temperature must be a finite number >= 0, got " + std::to_string(params.temperature));
  }
  if (params.top_k < 0) {
    throw Error(ErrorCode::INVALID_ARGUMENT, "sampler: top_k must be >= 0, got " + std::to_string(params.top_k));
  }
  if (!(params.top_p > 0.0f)) {
    throw Error(ErrorCode::INVALID_ARGUMENT,
                "sampler: top_p must be > 0 (>= 1 turns it off), got " + std::to_string(params.top_p));
  }
  // llama2.c uses the seed as the state. xorshift's state must not be 0 (it would stay 0).
  rng_state_ = params.seed != 0 ? params.seed : 0x9E3779B97F4A7C15ULL;
  if (params.rng_state != 0) rng_state_ = params.rng_state;  // resuming a saved stream
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (logits.empty()) throw Error(ErrorCode::INVALID_ARGUMENT, "sampler: empty logits");
  if (params_.temperature == 0.0f) return argmax(logits);

  const size_t n = logits.size();
  std::vector<float> probs(n);      // [n] logits / temperature, then probabilities
  for (size_t i = 0; i < n; i++) probs[i] = logits[i] / params_.temperature;
  std::vector<char> keep(n, 1);     // [n] 1 = candidate (top-k)
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) keep_top_k(probs, params_.top_k, keep);
  softmax(probs, keep);

  const float coin = random_f32(rng_state_);
  if (params_.top_p >= 1.0f || n == 1) return sample_multinomial(probs, coin);
  return sample_top_p(probs, params_.top_p, coin);
}

}  // namespace backprompt
