// The state behind a Cache and its Texts: model, prefix tree, tokenization memo, statistics.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "backprompt/cache.h"
#include "cache/prefix_tree.h"

namespace backprompt::detail {

// One piece of a Text: a string, or tokens fixed by generation (their string is their decoding).
struct Segment {
  std::string text;
  std::vector<int32_t> tokens;  // used when is_tokens
  bool is_tokens = false;
};

// What an evaluation must produce for one token path.
struct EvalRequest {
  std::vector<int32_t> tokens;
  bool logprobs = false;
  size_t logprobs_from = 1;
};

struct CacheImpl {
  CacheImpl(std::shared_ptr<const Model> m, CacheOptions o);

  std::shared_ptr<const Model> model;
  CacheOptions options;
  PrefixTree tree;
  CacheStats stats;
  uint64_t tick = 0;
  mutable std::recursive_mutex mu;

  // Tokens of a text under the cache's policy (memoised per segment string).
  std::vector<int32_t> tokenize(const std::vector<std::shared_ptr<const Segment>>& segs);
  std::vector<int32_t> tokenize_joined(const std::vector<std::shared_ptr<const Segment>>& segs) const;
  const std::vector<int32_t>& segment_tokens(const std::string& s, bool at_start);

  // Computes what the requests need (K/V, next logits, logprobs) and returns each request's
  // path of nodes, marked in use (release with release_paths). Splits the requests into groups
  // when they do not fit the budget together.
  std::vector<std::vector<Node*>> evaluate(std::span<const EvalRequest> requests);
  void release_paths(std::vector<std::vector<Node*>>& paths);

  // Puts already computed state for the path `tokens` into the tree: positions [from, n) of the
  // given K/V ([n_layer][layer_stride/kv_dim][kv_dim], layer l at k + l*layer_stride, position p at
  // row p - from), logprobs (position p at logprobs[p - from], may be empty) and the logits after
  // the last token. Parts already in the tree are kept as they are. Evicts if over budget.
  void insert_computed(std::span<const int32_t> tokens, int32_t from, const float* k, const float* v, int64_t layer_stride,
                       std::span<const float> logprobs, std::span<const float> last_logits);

 private:
  // One group that fits the budget; paths returned in use.
  std::vector<std::vector<Node*>> evaluate_group(std::span<const EvalRequest> requests);
  std::map<std::pair<std::string, bool>, std::vector<int32_t>> segment_memo_;
};

}  // namespace backprompt::detail
