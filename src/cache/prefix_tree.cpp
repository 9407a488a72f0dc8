#include "cache/prefix_tree.h"

#include <algorithm>
#include <queue>

#include "backprompt/error.h"

namespace backprompt::detail {

PrefixTree::PrefixTree(const ModelConfig& config) : config_(config) {}

uint64_t PrefixTree::pending_bytes(int32_t n_tokens) const {
  const uint64_t n = static_cast<uint64_t>(n_tokens);
  return 2 * n * config_.n_layer * config_.kv_dim() * sizeof(float) + n * sizeof(float) +
         static_cast<uint64_t>(config_.n_vocab) * sizeof(float);
}

uint64_t PrefixTree::node_bytes(const Node& n) const {
  return (n.k.size() + n.v.size() + n.logprobs.size() + n.last_logits.size()) * sizeof(float);
}

Node* PrefixTree::add_child(Node& parent, std::vector<int32_t> tokens) {
  BP_ASSERT(!tokens.empty());
  auto node = std::make_unique<Node>();
  node->parent = &parent;
  node->pos0 = parent.end();
  node->tokens = std::move(tokens);
  node->id = next_id_++;
  node->last_used = parent.last_used;
  Node* raw = node.get();
  const int32_t first = raw->tokens[0];
  BP_ASSERT(parent.children.find(first) == parent.children.end());
  parent.children.emplace(first, std::move(node));
  ++n_nodes_;
  return raw;
}

void PrefixTree::split(Node& n, int32_t at) {
  BP_ASSERT(at > 0 && at < n.n_tokens());
  BP_ASSERT(n.in_use == 0);  // evaluations mark their paths only after all splits
  const int32_t len = n.n_tokens();
  auto tail = std::make_unique<Node>();
  tail->parent = &n;
  tail->pos0 = n.pos0 + at;
  tail->tokens.assign(n.tokens.begin() + at, n.tokens.end());
  tail->children = std::move(n.children);
  for (auto& [tok, c] : tail->children) c->parent = tail.get();
  tail->computed = n.computed;
  tail->pins = n.pins;
  tail->last_used = n.last_used;
  tail->id = next_id_++;
  if (n.computed) {
    // K/V [n_layer][len][kv_dim] -> head [n_layer][at][kv_dim] + tail [n_layer][len-at][kv_dim].
    const int64_t kv = config_.kv_dim();
    KvBuffer hk(static_cast<size_t>(config_.n_layer) * at * kv), hv(hk.size());
    tail->k.resize(static_cast<size_t>(config_.n_layer) * (len - at) * kv);
    tail->v.resize(tail->k.size());
    for (int32_t l = 0; l < config_.n_layer; ++l) {
      const size_t src = static_cast<size_t>(l) * len * kv;
      std::copy_n(n.k.begin() + src, at * kv, hk.begin() + static_cast<size_t>(l) * at * kv);
      std::copy_n(n.v.begin() + src, at * kv, hv.begin() + static_cast<size_t>(l) * at * kv);
      std::copy_n(n.k.begin() + src + at * kv, (len - at) * kv, tail->k.begin() + static_cast<size_t>(l) * (len - at) * kv);
      std::copy_n(n.v.begin() + src + at * kv, (len - at) * kv, tail->v.begin() + static_cast<size_t>(l) * (len - at) * kv);
    }
    n.k.swap(hk);
    n.v.swap(hv);
    if (!n.logprobs.empty()) {
      tail->logprobs.assign(n.logprobs.begin() + at, n.logprobs.end());
      n.logprobs.resize(static_cast<size_t>(at));
    }
    tail->last_logits = std::move(n.last_logits);
    n.last_logits.clear();  // the logits after token at-1 were never kept
  }
  n.tokens.resize(static_cast<size_t>(at));
  n.children.clear();
  n.children.emplace(tail->tokens[0], std::move(tail));
  ++n_nodes_;
}

std::vector<Node*> PrefixTree::insert_path(std::span<const int32_t> tokens) {
  std::vector<Node*> path;
  Node* cur = &root_;
  size_t i = 0;
  while (i < tokens.size()) {
    auto it = cur->children.find(tokens[i]);
    if (it == cur->children.end()) {
      cur = add_child(*cur, std::vector<int32_t>(tokens.begin() + static_cast<ptrdiff_t>(i), tokens.end()));
      path.push_back(cur);
      break;
    }
    Node* child = it->second.get();
    int32_t m = 0;
    while (m < child->n_tokens() && i + static_cast<size_t>(m) < tokens.size() && child->tokens[m] == tokens[i + m]) ++m;
    if (m < child->n_tokens()) split(*child, m);
    path.push_back(child);
    i += static_cast<size_t>(m);
    cur = child;
  }
  return path;
}

std::vector<Node*> PrefixTree::match(std::span<const int32_t> tokens, int32_t* n_matched) {
  std::vector<Node*> path;
  Node* cur = &root_;
  size_t i = 0;
  while (i < tokens.size()) {
    auto it = cur->children.find(tokens[i]);
    if (it == cur->children.end()) break;
    Node* child = it->second.get();
    if (!child->computed || i + child->tokens.size() > tokens.size() ||
        !std::equal(child->tokens.begin(), child->tokens.end(), tokens.begin() + static_cast<ptrdiff_t>(i)))
      break;
    path.push_back(child);
    i += child->tokens.size();
    cur = child;
  }
  *n_matched = static_cast<int32_t>(i);
  return path;
}

void PrefixTree::remove(Node& n) {
  BP_ASSERT(!n.is_root());
  std::vector<Node*> stack = {&n};
  uint64_t freed = 0, count = 0;
  while (!stack.empty()) {
    Node* x = stack.back();
    stack.pop_back();
    freed += node_bytes(*x);
    ++count;
    for (auto& [tok, c] : x->children) stack.push_back(c.get());
  }
  bytes_ -= freed;
  n_nodes_ -= count;
  n.parent->children.erase(n.tokens[0]);
}

void PrefixTree::remove_pending() {
  std::vector<Node*> pending;
  for_each([&](Node& n) {
    if (!n.computed && (n.parent->is_root() || n.parent->computed)) pending.push_back(&n);
  });
  for (Node* n : pending) remove(*n);
}

uint64_t PrefixTree::evict_until(uint64_t target) {
  auto evictable = [](const Node& n) {
    return n.computed && n.children.empty() && n.pins == 0 && n.in_use == 0;
  };
  using Entry = std::pair<uint64_t, Node*>;  // (last_used, node), oldest first
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> leaves;
  for_each([&](Node& n) {
    if (evictable(n)) leaves.emplace(n.last_used, &n);
  });
  uint64_t n_evicted = 0;
  while (bytes_ > target && !leaves.empty()) {
    Node* n = leaves.top().second;
    leaves.pop();
    Node* parent = n->parent;
    remove(*n);
    ++n_evicted;
    if (!parent->is_root() && evictable(*parent)) leaves.emplace(parent->last_used, parent);
  }
  return n_evicted;
}

}  // namespace backprompt::detail
