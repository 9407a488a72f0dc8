// The path of one evaluation: token paths -> prefix tree (match, split, pending nodes) -> one
// ragged batch of every missing span (chunked to bound activation memory) -> outputs into nodes.
#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <unordered_map>
#include <unordered_set>

#include "backprompt/error.h"
#include "cache/cache_impl.h"

namespace backprompt::detail {

namespace {

// Thrown inside evaluate_group when the group does not fit the memory budget together.
struct DoesNotFit {
  uint64_t needed, budget;
};

// One span of rows in a forward call: tokens [begin, end) of a node, computed for the first time
// (K/V into the node) or re-run for outputs lost in a split (K/V into scratch).
struct Work {
  Node* node;
  int32_t begin, end;
  bool refresh;
  LogitsMode mode;
};

// log Σ exp(x_i): exp in float (vectorisable), sums in eight float lanes folded in double.
float log_sum_exp(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += std::exp(x[i + j] - m);
  double s = 0.0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  for (; i < n; ++i) s += std::exp(x[i] - m);
  return m + static_cast<float>(std::log(s));
}

}  // namespace

CacheImpl::CacheImpl(std::shared_ptr<const Model> m, CacheOptions o)
    : model(std::move(m)), options(o), tree(model->config()) {
  if (options.max_batch_tokens < 1)
    throw Error(ErrorCode::INVALID_ARGUMENT, "cache: max_batch_tokens must be at least 1");
  if (!options.store.empty()) {
    if (options.store_block_size < 1) throw Error(ErrorCode::INVALID_ARGUMENT, "cache: store_block_size must be at least 1");
    const ModelConfig& c = model->config();
    block_ctx.model_fp = model->fingerprint();
    block_ctx.tokenizer_fp = model->tokenizer_fingerprint();
    block_ctx.codec = kv_codec_for(options.store_kv_type, options.store_zstd);
    block_ctx.n_layer = c.n_layer;
    block_ctx.kv_dim = c.kv_dim();
    block_ctx.n_vocab = c.n_vocab;
    block_ctx.block_size = options.store_block_size;
    store = Store::open(options.store);
    writer = std::make_unique<StoreWriter>(*store);
  }
}

CacheImpl::~CacheImpl() = default;

void CacheImpl::fill_node(Node& node, int32_t from, const float* k, const float* v, int64_t layer_stride,
                          std::span<const float> logprobs, std::span<const float> last_logits, int32_t n_total) {
  const ModelConfig& c = model->config();
  const int64_t kv = c.kv_dim();
  const int32_t a = node.pos0 - from, len = node.n_tokens();
  BP_ASSERT(!node.computed && a >= 0 && node.end() <= n_total);
  node.k.resize(static_cast<size_t>(c.n_layer) * len * kv);
  node.v.resize(node.k.size());
  for (int32_t l = 0; l < c.n_layer; ++l) {
    std::copy_n(k + l * layer_stride + a * kv, len * kv, node.k.begin() + static_cast<size_t>(l) * len * kv);
    std::copy_n(v + l * layer_stride + a * kv, len * kv, node.v.begin() + static_cast<size_t>(l) * len * kv);
  }
  if (!logprobs.empty()) {
    // A node keeps logprobs only if every one is known (the text's first token has none).
    node.logprobs.assign(logprobs.begin() + a, logprobs.begin() + a + len);
    for (int32_t i = 0; i < len; ++i)
      if (std::isnan(node.logprobs[static_cast<size_t>(i)]) && node.pos0 + i > 0) {
        node.logprobs.clear();
        break;
      }
  }
  if (node.end() == n_total && !last_logits.empty()) node.last_logits.assign(last_logits.begin(), last_logits.end());
  node.computed = true;
  node.last_used = ++tick;
  tree.add_bytes(static_cast<int64_t>(tree.node_bytes(node)));
}

void CacheImpl::insert_computed(std::span<const int32_t> tokens, int32_t from, const float* k, const float* v,
                                int64_t layer_stride, std::span<const float> logprobs, std::span<const float> last_logits) {
  // Everything not yet in the tree lies after `from`: the new nodes come from the given state.
  for (Node* node : tree.insert_path(tokens))
    if (!node->computed) fill_node(*node, from, k, v, layer_stride, logprobs, last_logits, static_cast<int32_t>(tokens.size()));
  if (tree.bytes() > options.memory_budget) stats.evictions += tree.evict_until(options.memory_budget);
}

HeldPath::HeldPath(CacheImpl& c, const EvalRequest& req) : c_(c) {
  if (req.tokens.empty()) throw Error(ErrorCode::INVALID_ARGUMENT, "text: the text has no tokens");
  paths_ = c.evaluate(std::span<const EvalRequest>(&req, 1));
  BP_ASSERT(paths_.size() == 1 && !paths_[0].empty() && paths_[0].back()->end() == static_cast<int32_t>(req.tokens.size()));
}

void CacheImpl::release_paths(std::vector<std::vector<Node*>>& paths) {
  for (auto& p : paths)
    for (Node* n : p) --n->in_use;
  paths.clear();
}

std::vector<std::vector<Node*>> CacheImpl::evaluate(std::span<const EvalRequest> requests) {
  try {
    return evaluate_group(requests);
  } catch (const DoesNotFit& e) {
    if (requests.size() == 1)
      throw Error(ErrorCode::OUT_OF_MEMORY, "cache: a text of " + std::to_string(requests[0].tokens.size()) +
                                                " tokens needs " + std::to_string(e.needed) +
                                                " bytes, more than the memory budget of " + std::to_string(e.budget) +
                                                " bytes allows next to pinned nodes");
  }
  // Halves, each evaluated and released before the next, so the budget holds throughout.
  const size_t half = requests.size() / 2;
  std::vector<std::vector<Node*>> a = evaluate(requests.subspan(0, half));
  release_paths(a);
  std::vector<std::vector<Node*>> b = evaluate(requests.subspan(half));
  release_paths(b);
  return {};
}

std::vector<std::vector<Node*>> CacheImpl::evaluate_group(std::span<const EvalRequest> requests) {
  const ModelConfig& c = model->config();
  const int64_t kv = c.kv_dim();
  ++tick;

  // 1. Paths: insert all first (inserting may split nodes of earlier paths), then walk again.
  for (const EvalRequest& r : requests) tree.insert_path(r.tokens);
  loaded_nodes.clear();
  if (store)
    for (const EvalRequest& r : requests) load_from_store(r.tokens);
  std::vector<std::vector<Node*>> paths;
  std::vector<Node*> pending;  // topological: parents first
  std::unordered_set<Node*> seen;
  uint64_t reused = 0;
  for (const EvalRequest& r : requests) {
    paths.push_back(tree.insert_path(r.tokens));
    for (Node* n : paths.back()) {
      ++n->in_use;
      n->last_used = tick;
      if (!n->computed) {
        if (seen.insert(n).second) pending.push_back(n);
      } else if (!loaded_nodes.count(n)) {
        reused += static_cast<uint64_t>(n->n_tokens());
      }
    }
  }

  // 2. What each node must provide.
  std::unordered_map<Node*, bool> need_last, need_lp;
  for (size_t i = 0; i < requests.size(); ++i) {
    const std::vector<Node*>& path = paths[i];
    if (path.empty()) continue;
    need_last[path.back()] = true;
    if (!requests[i].logprobs) continue;
    for (Node* n : path)
      if (static_cast<size_t>(n->end()) > requests[i].logprobs_from) need_lp[n] = true;
  }
  std::vector<Work> works;
  uint64_t refresh_tokens = 0;
  auto add_chunks = [&](Node* n, bool refresh, bool all_logits) {
    for (int32_t b = 0; b < n->n_tokens(); b += options.max_batch_tokens) {
      const int32_t e = std::min(n->n_tokens(), b + options.max_batch_tokens);
      const LogitsMode mode = all_logits ? LogitsMode::ALL : (e == n->n_tokens() ? LogitsMode::LAST : LogitsMode::NONE);
      works.push_back({n, b, e, refresh, mode});
    }
  };
  std::vector<Node*> lp_nodes;  // nodes whose logprobs this evaluation fills
  // Computed nodes first (refreshes read only computed K/V), then pending ones in order.
  for (auto& p : paths)
    for (Node* n : p) {
      if (!n->computed || !seen.insert(n).second) continue;
      if (need_lp.count(n) && n->logprobs.empty()) {
        add_chunks(n, true, true);
        refresh_tokens += static_cast<uint64_t>(n->n_tokens());
        lp_nodes.push_back(n);
      } else if (need_last.count(n) && n->last_logits.empty()) {
        works.push_back({n, n->n_tokens() - 1, n->n_tokens(), true, LogitsMode::LAST});
        refresh_tokens += 1;
      }
    }
  for (Node* n : pending) {
    add_chunks(n, false, need_lp.count(n) > 0);
    if (need_lp.count(n)) lp_nodes.push_back(n);
  }
  // A node's first logprob comes from its parent's last logits, lost if the parent was split.
  for (Node* n : lp_nodes) {
    Node* p = n->parent;
    if (p->is_root() || !p->computed || !p->last_logits.empty()) continue;
    const bool queued = std::any_of(works.begin(), works.end(), [&](const Work& w) {
      return w.node == p && w.end == p->n_tokens() && w.mode != LogitsMode::NONE;
    });
    if (!queued) {
      works.insert(works.begin(), {p, p->n_tokens() - 1, p->n_tokens(), true, LogitsMode::LAST});
      refresh_tokens += 1;
    }
  }
  // 3. Room in the budget for the new nodes.
  uint64_t needed = 0;
  for (Node* n : pending) needed += tree.pending_bytes(n->n_tokens());
  for (Node* n : lp_nodes)
    if (n->computed) needed += static_cast<uint64_t>(n->n_tokens() + c.n_vocab) * sizeof(float);
  for (const Work& w : works)  // logits rows brought back to computed nodes that lost them in a split
    if (w.refresh && w.mode == LogitsMode::LAST && w.node->last_logits.empty())
      needed += static_cast<uint64_t>(c.n_vocab) * sizeof(float);
  auto abandon = [&] {
    release_paths(paths);
    tree.remove_pending();
    if (tree.bytes() > options.memory_budget) stats.evictions += tree.evict_until(options.memory_budget);
  };
  if (tree.bytes() + needed > options.memory_budget) {
    if (needed <= options.memory_budget) stats.evictions += tree.evict_until(options.memory_budget - needed);
    if (tree.bytes() + needed > options.memory_budget) {
      abandon();
      throw DoesNotFit{needed, options.memory_budget};
    }
  }

  // 4. Forward calls of at most max_batch_tokens rows, in order.
  std::unordered_map<Node*, uint64_t> refreshed_bytes;  // computed nodes gaining outputs: bytes before
  for (const Work& w : works)
    if (w.refresh) refreshed_bytes.emplace(w.node, tree.node_bytes(*w.node));
  try {
    for (Node* n : pending) {
      n->k.resize(static_cast<size_t>(c.n_layer) * n->n_tokens() * kv);  // written whole by forward()
      n->v.resize(n->k.size());
      n->logprobs.clear();
      if (need_lp.count(n)) n->logprobs.assign(static_cast<size_t>(n->n_tokens()), std::numeric_limits<float>::quiet_NaN());
    }
    for (Node* n : lp_nodes)
      if (n->computed) n->logprobs.assign(static_cast<size_t>(n->n_tokens()), std::numeric_limits<float>::quiet_NaN());

    size_t next = 0;
    while (next < works.size()) {
      size_t end = next;
      int64_t rows = 0;
      while (end < works.size() && (end == next || rows + (works[end].end - works[end].begin) <= options.max_batch_tokens)) {
        rows += works[end].end - works[end].begin;
        ++end;
      }
      const size_t n_spans = end - next;
      std::vector<std::vector<KvSpanView>> pasts(n_spans);
      std::vector<BigVector<float>> scratch_k(n_spans), scratch_v(n_spans), logits(n_spans);
      std::vector<ForwardSpan> spans(n_spans);
      for (size_t i = 0; i < n_spans; ++i) {
        const Work& w = works[next + i];
        Node* n = w.node;
        std::vector<const Node*> chain;
        for (const Node* a = n->parent; !a->is_root(); a = a->parent) chain.push_back(a);
        for (auto it = chain.rbegin(); it != chain.rend(); ++it) pasts[i].push_back((*it)->view());
        const int64_t stride = static_cast<int64_t>(n->n_tokens()) * kv;
        if (w.begin > 0) pasts[i].push_back({n->k.data(), n->v.data(), w.begin, stride});
        ForwardSpan& s = spans[i];
        s.past = pasts[i];
        s.tokens = std::span<const int32_t>(n->tokens.data() + w.begin, static_cast<size_t>(w.end - w.begin));
        s.pos0 = n->pos0 + w.begin;
        if (w.refresh) {
          scratch_k[i].resize(static_cast<size_t>(c.n_layer) * (w.end - w.begin) * kv);
          scratch_v[i].resize(scratch_k[i].size());
          s.k_out = scratch_k[i].data();
          s.v_out = scratch_v[i].data();
        } else {
          s.k_out = n->k.data() + w.begin * kv;
          s.v_out = n->v.data() + w.begin * kv;
          s.out_layer_stride = stride;
        }
        s.logits = w.mode;
        if (w.mode == LogitsMode::LAST) logits[i].resize(static_cast<size_t>(c.n_vocab));
        if (w.mode == LogitsMode::ALL) logits[i].resize(static_cast<size_t>(w.end - w.begin) * c.n_vocab);
        s.logits_out = logits[i].data();
      }
      forward(*model, spans);
      ++stats.forward_calls;
      for (size_t i = 0; i < n_spans; ++i) {
        const Work& w = works[next + i];
        Node* n = w.node;
        if (w.mode == LogitsMode::ALL) {
#pragma omp parallel for schedule(static) if (w.end - w.begin > 1)
          for (int32_t t = w.begin; t < w.end; ++t) {
            const float* row = logits[i].data() + static_cast<int64_t>(t - w.begin) * c.n_vocab;
            if (t + 1 < n->n_tokens()) n->logprobs[static_cast<size_t>(t + 1)] = row[n->tokens[t + 1]] - log_sum_exp(row, c.n_vocab);
          }
          if (w.end == n->n_tokens())
            n->last_logits.assign(logits[i].end() - c.n_vocab, logits[i].end());
        } else if (w.mode == LogitsMode::LAST && w.end == n->n_tokens()) {
          n->last_logits.assign(logits[i].begin(), logits[i].end());
        }
      }
      next = end;
    }
  } catch (const std::bad_alloc&) {
    abandon();
    throw Error(ErrorCode::OUT_OF_MEMORY, "cache: out of memory while evaluating");
  } catch (...) {
    abandon();
    throw;
  }

  // 5. First logprobs from parents, then account the new bytes.
  for (Node* n : lp_nodes) {
    if (n->parent->is_root()) continue;
    const std::vector<float>& pl = n->parent->last_logits;
    BP_ASSERT(!pl.empty());
    n->logprobs[0] = pl[static_cast<size_t>(n->tokens[0])] - log_sum_exp(pl.data(), c.n_vocab);
  }
  for (Node* n : pending) {
    n->computed = true;
    stats.tokens_computed += static_cast<uint64_t>(n->n_tokens());
    tree.add_bytes(static_cast<int64_t>(tree.node_bytes(*n)));
  }
  for (auto& [n, old_bytes] : refreshed_bytes)
    tree.add_bytes(static_cast<int64_t>(tree.node_bytes(*n)) - static_cast<int64_t>(old_bytes));
  stats.tokens_reused += reused;
  stats.tokens_recomputed += refresh_tokens;
  if (store)
    for (size_t i = 0; i < requests.size(); ++i) write_to_store(requests[i].tokens, paths[i]);
  if (tree.bytes() > options.memory_budget) stats.evictions += tree.evict_until(options.memory_budget);
  return paths;
}

}  // namespace backprompt::detail
