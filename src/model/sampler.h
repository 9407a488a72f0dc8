// Choosing the next token from logits: greedy, temperature, top-k, top-p; seeded and reproducible.
#pragma once

#include <cstdint>
#include <span>

#include "backprompt/sampling.h"

namespace backprompt {

// The greedy choice: the id of the largest logit, the lowest of equal ones; NaN logits are never
// chosen over a number. 0 for an empty span.
int32_t argmax(std::span<const float> logits);

// Thread-safety: none (holds RNG state). Copyable: a copy continues the same random stream.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  int32_t sample(std::span<const float> logits);
  const SamplingParams& params() const { return params_; }
  uint64_t rng_state() const { return rng_state_; }          // for snapshots: resume exactly
  void set_rng_state(uint64_t s) { rng_state_ = s; }

 private:
  SamplingParams params_;
  uint64_t rng_state_;
};

}  // namespace backprompt
