// The prefix tree (radix tree over token ids) that holds computed K/V.
//
// A node holds one span of tokens: its K/V for every layer, conditioned on all its ancestors,
// and its outputs (per-token logprobs; the logits after its last token). A computed node's K/V
// never change; a partial match splits a node in two (copying its K/V into the halves).
// Nodes are "pending" between their creation by an evaluation and the forward pass that fills
// them. The tree knows token ids and node handles, never kernels.
//
// Thread-safety: none; the Cache serialises access.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "backprompt/model.h"
#include "model/reserved_buffer.h"
#include "model/runtime.h"

namespace backprompt::detail {

// K/V buffers: written whole by the runtime or by a copy right after allocation, so resize()
// leaves them uninitialised; large ones get huge pages (first-touch faults dominate otherwise).
using KvBuffer = BigVector<float>;

struct Node {
  Node* parent = nullptr;
  std::map<int32_t, std::unique_ptr<Node>> children;  // by first token
  std::vector<int32_t> tokens;   // [n] the span
  int32_t pos0 = 0;              // position of tokens[0] = number of ancestor tokens
  KvBuffer k, v;                 // [n_layer][n][kv_dim]; allocated when computed (or about to be)
  std::vector<float> logprobs;   // [n] log p(tokens[i] | before), NaN at position 0; empty if not computed
  std::vector<float> last_logits;  // [n_vocab] after tokens[n-1]; empty if unknown (after a split)
  bool computed = false;
  int32_t pins = 0;              // pinned texts passing through
  int32_t in_use = 0;            // evaluations in progress needing this node
  uint64_t last_used = 0;        // tick of the last evaluation that used it
  uint64_t id = 0;               // stable name for graphs

  int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
  int32_t end() const { return pos0 + n_tokens(); }
  bool is_root() const { return parent == nullptr; }
  KvSpanView view() const { return {k.data(), v.data(), n_tokens(), 0}; }
};

class PrefixTree {
 public:
  explicit PrefixTree(const ModelConfig& config);

  Node& root() { return root_; }
  const Node& root() const { return root_; }

  // The nodes covering `tokens` from the root, creating pending nodes for the part not in the
  // tree and splitting a node where the path leaves it midway. Returns the path, root excluded
  // (empty for no tokens); the last node ends exactly at tokens.size().
  std::vector<Node*> insert_path(std::span<const int32_t> tokens);
  // The nodes of the longest computed prefix of `tokens` that ends on a node boundary, without
  // changing the tree. Returns the path and the number of tokens it covers.
  std::vector<Node*> match(std::span<const int32_t> tokens, int32_t* n_matched);

  // Removes every pending node (used when an evaluation is abandoned).
  void remove_pending();
  // Bytes a node holds (K/V, logprobs, logits), or will hold once computed with logprobs.
  uint64_t node_bytes(const Node& n) const;
  uint64_t pending_bytes(int32_t n_tokens) const;  // K/V + logprobs + one logits row
  void add_bytes(int64_t delta) { bytes_ += static_cast<uint64_t>(delta); }
  uint64_t bytes() const { return bytes_; }
  uint64_t n_nodes() const { return n_nodes_; }

  // Splits n so that it keeps tokens [0, at) and a new child holds [at, n). n must not be in use.
  void split(Node& n, int32_t at);

  // Evicts unpinned, unused, computed leaves, least recently used first, until at most
  // `target` bytes are held or nothing more can go. Returns the number evicted.
  uint64_t evict_until(uint64_t target);

  // Applies f to every node except the root, parents before children.
  template <class F> void for_each(F&& f) { visit(root_, f); }

 private:
  template <class F> void visit(Node& n, F& f) {
    for (auto& [tok, c] : n.children) {
      f(*c);
      visit(*c, f);
    }
  }
  Node* add_child(Node& parent, std::vector<int32_t> tokens);
  void remove(Node& n);

  ModelConfig config_;
  Node root_;
  uint64_t bytes_ = 0;
  uint64_t n_nodes_ = 0;
  uint64_t next_id_ = 1;
};

}  // namespace backprompt::detail
