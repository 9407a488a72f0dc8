// Generation with stories260K against llama2.c's published outputs (../shared/models/stories260k
// SOURCE.md): greedy, and sampled with llama2.c's xorshift RNG and top-p, all 200 steps.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "backprompt/model.h"
#include "model/runtime.h"
#include "model/sampler.h"
#include "stories260k_reference.h"
#include "test_util.h"

namespace bp = backprompt;
using namespace backprompt::testing;  // the reference texts

namespace {

std::shared_ptr<bp::Model> load_stories() {
  const std::string path = bp::testing::test_data_file("stories260k/stories260K.gguf");
  if (path.empty()) return nullptr;
  return bp::Model::load(path);
}

// llama2.c's generate(): BOS + prompt, `steps` positions in all (prompt tokens are forced,
// the rest sampled), stop early at BOS; a piece right after BOS loses its leading space.
std::string generate_like_llama2c(const bp::Model& model, const std::string& prompt, const bp::SamplingParams& params,
                                  int32_t steps) {
  const bp::Tokenizer& tok = model.tokenizer();
  std::vector<int32_t> prompt_tokens = tok.encode(prompt, {.add_bos = true});  // [n_prompt]
  bp::Sampler sampler(params);
  bp::Sequence seq(model);
  std::string out;
  int32_t token = prompt_tokens[0];
  for (int32_t pos = 0; pos < steps; pos++) {
    std::vector<float> logits = seq.append(std::span<const int32_t>(&token, 1));  // [n_vocab]
    const int32_t next = pos + 1 < static_cast<int32_t>(prompt_tokens.size()) ? prompt_tokens[pos + 1]
                                                                               : sampler.sample(logits);
    if (next == tok.bos()) break;
    std::string piece = tok.token_to_piece(next);
    if (token == tok.bos() && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
    out += piece;
    token = next;
  }
  return out;
}

bp::SamplingParams params(float temperature, float top_p, uint64_t seed) {
  bp::SamplingParams p;
  p.temperature = temperature;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}

}  // namespace

#define REQUIRE_STORIES(model)                                                                         \
  auto model = load_stories();                                                                         \
  if (!model) GTEST_SKIP() << "test data stories260k/stories260K.gguf not found (BACKPROMPT_TEST_DATA)"

TEST(GenerateStories260K, GreedyFromBos) {
  REQUIRE_STORIES(model);
  EXPECT_EQ(generate_like_llama2c(*model, "", params(0.0f, 1.0f, 42), 200), TEXT_GREEDY);
}

TEST(GenerateStories260K, SampledTemperature1Seed42) {
  REQUIRE_STORIES(model);
  EXPECT_EQ(generate_like_llama2c(*model, "", params(1.0f, 1.0f, 42), 200), TEXT_T1_P1_S42);
}

TEST(GenerateStories260K, SampledTopP095Seed42) {
  REQUIRE_STORIES(model);
  EXPECT_EQ(generate_like_llama2c(*model, "", params(1.0f, 0.95f, 42), 200), TEXT_T1_P095_S42);
}

TEST(GenerateStories260K, SampledTopP095Seed42WithPrompt) {
  REQUIRE_STORIES(model);
  EXPECT_EQ(generate_like_llama2c(*model, "There was a big", params(1.0f, 0.95f, 42), 200), TEXT_PROMPT_T1_P095_S42);
}

TEST(GenerateStories260K, PromptInOneBatchEqualsTokenByToken) {
  // The CLI evaluates the prompt as one span; the continuation must be the same.
  REQUIRE_STORIES(model);
  const bp::Tokenizer& tok = model->tokenizer();
  std::vector<int32_t> prompt = tok.encode("There was a big", {.add_bos = true});
  bp::Sequence seq(*model);
  std::vector<float> logits = seq.append(prompt);
  bp::Sampler sampler(params(1.0f, 0.95f, 42));
  std::string out = "There was a big";
  for (int32_t i = 0; i < 200 - static_cast<int32_t>(prompt.size()) + 1; i++) {
    const int32_t next = sampler.sample(logits);
    out += tok.token_to_piece(next);
    logits = seq.append(std::span<const int32_t>(&next, 1));
  }
  EXPECT_EQ(out, TEXT_PROMPT_T1_P095_S42);
}
