// The state behind a Cache and its Texts: model, prefix tree, tokenization memo, statistics.
#pragma once

#include <map>
#include <unordered_set>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "backprompt/cache.h"
#include "cache/prefix_tree.h"
#include "store/block.h"
#include "store/store.h"

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

// The at-rest codec of a public K/V storage type.
KvCodec kv_codec_for(KvType type, bool zstd);

struct StoreKeyHash {
  size_t operator()(const StoreKey& k) const { return static_cast<size_t>(k.hi ^ (k.lo * 0x9E3779B97F4A7C15ULL)); }
};

struct CacheImpl {
  CacheImpl(std::shared_ptr<const Model> m, CacheOptions o);
  ~CacheImpl();

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

  // The store (src/cache/persist.cpp). load_from_store fills the pending nodes at the start of
  // the path's missing part with whatever whole blocks (and exact-path entry) the store has;
  // write_to_store queues the path's blocks the store does not have yet.
  std::unique_ptr<Store> store;
  std::unique_ptr<StoreWriter> writer;
  BlockContext block_ctx;
  std::unordered_set<Node*> loaded_nodes;  // filled from the store during the current evaluation
  void load_from_store(std::span<const int32_t> tokens);
  void write_to_store(std::span<const int32_t> tokens, const std::vector<Node*>& path);

 private:
  // One group that fits the budget; paths returned in use.
  std::vector<std::vector<Node*>> evaluate_group(std::span<const EvalRequest> requests);
  std::map<std::pair<std::string, bool>, std::vector<int32_t>> segment_memo_;
  std::unordered_set<StoreKey, StoreKeyHash> known_keys_;  // in the store (read or written)
  // Copies positions [node.pos0, node.end()) of a state that starts at `from` into a pending node.
  void fill_node(Node& node, int32_t from, const float* k, const float* v, int64_t layer_stride,
                 std::span<const float> logprobs, std::span<const float> last_logits, int32_t n_total);
};

// Evaluates one request and keeps its path in use (safe from eviction) while it is read.
// Error(INVALID_ARGUMENT) for a request with no tokens.
class HeldPath {
 public:
  HeldPath(CacheImpl& c, const EvalRequest& req);
  ~HeldPath() { c_.release_paths(paths_); }
  HeldPath(const HeldPath&) = delete;
  HeldPath& operator=(const HeldPath&) = delete;
  const std::vector<Node*>& nodes() const { return paths_[0]; }
  Node& last() const { return *paths_[0].back(); }

 private:
  CacheImpl& c_;
  std::vector<std::vector<Node*>> paths_;
};

}  // namespace backprompt::detail
