// The cache's link to the persistent store: before computing, fill the start of each path's
// missing part from stored blocks; after computing, queue the blocks the store lacks.
//
// Blocks lie at fixed positions [j*B, (j+1)*B) of a token path (B = store_block_size) and are
// keyed by a hash chain over their tokens, so any two paths sharing a prefix of whole blocks
// share those keys. The trailing partial block and the logits after the last token live under
// the path's exact-path key. A block that is missing, unreadable or made under another context
// is a miss: the tokens are computed, and the result is exact either way (with f32 at rest).
#include <cmath>
#include <cstdio>
#include <limits>

#include "backprompt/error.h"
#include "cache/cache_impl.h"

namespace backprompt::detail {

KvCodec kv_codec_for(KvType type, bool zstd) {
  KvCodec c;
  c.zstd = zstd;
  switch (type) {
    case KvType::F32: c.type = DType::F32; break;
    case KvType::F16: c.type = DType::F16; break;
    case KvType::BF16: c.type = DType::BF16; break;
    case KvType::Q8_0: c.type = DType::Q8_0; break;
  }
  return c;
}

namespace {

// Fetches and decodes one block; a bad value is reported once, removed, and treated as a miss.
std::optional<BlockData> fetch(Store& store, const BlockContext& ctx, const StoreKey& key, int32_t pos0,
                               std::span<const int32_t> tokens) {
  std::optional<std::vector<uint8_t>> bytes = store.get(key);
  if (!bytes) return std::nullopt;
  try {
    BlockData b = decode_block(ctx, *bytes);
    if (b.pos0 != pos0 || b.tokens.size() != tokens.size() || !std::equal(tokens.begin(), tokens.end(), b.tokens.begin()))
      throw Error(ErrorCode::CORRUPT_FILE, "block " + key.hex() + " holds other tokens than its key names");
    return b;
  } catch (const Error& e) {
    static bool warned = false;
    if (!warned) std::fprintf(stderr, "backprompt: warning: store %s: %s (ignored; computing instead)\n", store.describe().c_str(), e.what());
    warned = true;
    store.remove(key);
    return std::nullopt;
  }
}

}  // namespace

void CacheImpl::load_from_store(std::span<const int32_t> tokens) {
  const int32_t n = static_cast<int32_t>(tokens.size()), B = block_ctx.block_size;
  // Where the tree's computed part of this path ends.
  int32_t p = 0;
  std::vector<Node*> path = tree.insert_path(tokens);
  for (Node* node : path) {
    if (!node->computed) break;
    p = node->end();
  }
  if (p >= n) return;

  // Whole blocks from the one containing p, then the exact-path entry if all of them were there.
  StoreKey chain = chain_root(block_ctx);
  for (int32_t j = 0; (j + 1) * B <= p; ++j) chain = chain_next(chain, tokens.subspan(static_cast<size_t>(j) * B, B));
  const int32_t start = (p / B) * B;  // first position of the loaded data
  std::vector<BlockData> blocks;
  int32_t m = start;                  // loaded positions: [start, m)
  bool complete = true;
  while (m + B <= n) {
    const StoreKey key = chain_next(chain, tokens.subspan(static_cast<size_t>(m), B));
    std::optional<BlockData> b = fetch(*store, block_ctx, key, m, tokens.subspan(static_cast<size_t>(m), B));
    if (!b) {
      complete = false;
      break;
    }
    known_keys_.insert(key);
    chain = key;
    blocks.push_back(std::move(*b));
    m += B;
  }
  std::vector<float> last_logits;
  if (complete) {
    const StoreKey key = path_key(chain, tokens.subspan(static_cast<size_t>(m)));
    std::optional<BlockData> b = fetch(*store, block_ctx, key, m, tokens.subspan(static_cast<size_t>(m)));
    if (b && b->last_logits.size() == static_cast<size_t>(block_ctx.n_vocab)) {
      known_keys_.insert(key);
      last_logits = b->last_logits;
      m = n;
      blocks.push_back(std::move(*b));
    }
  }
  if (m <= p) return;

  // Lay the loaded positions [start, m) out as one state, then fill the pending nodes in [p, m).
  const ModelConfig& c = model->config();
  const int64_t kv = c.kv_dim(), len = m - start;
  BigVector<float> k(static_cast<size_t>(c.n_layer * len * kv), 0.0f), v(k.size(), 0.0f);  // [n_layer][len][kv_dim]
  std::vector<float> logprobs(static_cast<size_t>(len), std::numeric_limits<float>::quiet_NaN());
  for (const BlockData& b : blocks) {
    const int64_t bn = static_cast<int64_t>(b.tokens.size()), off = b.pos0 - start;
    for (int32_t l = 0; l < c.n_layer; ++l) {
      std::copy_n(b.k.begin() + l * bn * kv, bn * kv, k.begin() + (l * len + off) * kv);
      std::copy_n(b.v.begin() + l * bn * kv, bn * kv, v.begin() + (l * len + off) * kv);
    }
    if (!b.logprobs.empty()) std::copy(b.logprobs.begin(), b.logprobs.end(), logprobs.begin() + off);
  }
  for (Node* node : tree.insert_path(tokens)) {
    if (node->computed || node->pos0 >= m) continue;
    if (node->end() > m) tree.split(*node, m - node->pos0);
    fill_node(*node, start, k.data(), v.data(), len * kv, logprobs, last_logits, m);
    loaded_nodes.insert(node);
    stats.tokens_loaded += static_cast<uint64_t>(node->n_tokens());
  }
}

void CacheImpl::write_to_store(std::span<const int32_t> tokens, const std::vector<Node*>& path) {
  const int32_t n = static_cast<int32_t>(tokens.size()), B = block_ctx.block_size;
  const ModelConfig& c = model->config();
  const int64_t kv = c.kv_dim();
  // Copies positions [a, b) of the path's state into a block.
  auto gather = [&](int32_t a, int32_t b) {
    BlockData d;
    d.pos0 = a;
    d.tokens.assign(tokens.begin() + a, tokens.begin() + b);
    const int64_t len = b - a;
    d.k.resize(static_cast<size_t>(c.n_layer * len * kv));
    d.v.resize(d.k.size());
    d.logprobs.assign(static_cast<size_t>(len), std::numeric_limits<float>::quiet_NaN());  // NaN: not known
    for (const Node* node : path) {
      const int32_t lo = std::max(a, node->pos0), hi = std::min(b, node->end());
      if (lo >= hi) continue;
      const int64_t nn = node->n_tokens(), cnt = hi - lo;
      for (int32_t l = 0; l < c.n_layer; ++l) {
        std::copy_n(node->k.begin() + (l * nn + (lo - node->pos0)) * kv, cnt * kv, d.k.begin() + (l * len + (lo - a)) * kv);
        std::copy_n(node->v.begin() + (l * nn + (lo - node->pos0)) * kv, cnt * kv, d.v.begin() + (l * len + (lo - a)) * kv);
      }
      if (!node->logprobs.empty()) std::copy_n(node->logprobs.begin() + (lo - node->pos0), cnt, d.logprobs.begin() + (lo - a));
    }
    return d;
  };
  StoreKey chain = chain_root(block_ctx);
  int32_t m = 0;
  for (; m + B <= n; m += B) {
    chain = chain_next(chain, tokens.subspan(static_cast<size_t>(m), B));
    if (known_keys_.insert(chain).second) writer->put(chain, encode_block(block_ctx, gather(m, m + B)));
  }
  const StoreKey key = path_key(chain, tokens.subspan(static_cast<size_t>(m)));
  if (path.empty() || path.back()->last_logits.empty() || known_keys_.count(key)) return;
  BlockData tail = gather(m, n);
  tail.last_logits = path.back()->last_logits;
  known_keys_.insert(key);
  writer->put(key, encode_block(block_ctx, tail));
}

}  // namespace backprompt::detail
