// Sampling parameters for generation: greedy, temperature, top-k, top-p; seeded and reproducible.
#pragma once

#include <cstdint>

namespace backprompt {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax; ties -> lowest id)
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // >= 1: off
  uint64_t seed = 42;
  uint64_t rng_state = 0;    // position of the random stream; 0: start from `seed`
};

}  // namespace backprompt
