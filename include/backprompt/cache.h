// backprompt::Cache: the memo of computed keys/values, a prefix tree over token ids under a
// memory budget, and the ragged batched evaluation that fills it.
//
// Semantics (see the README): every output served through the cache equals one uncached forward
// pass over the same tokens (f32 K/V); two texts with equal tokens share nodes however they were
// built; nodes never change once written; over budget, unpinned nodes not used by the running
// evaluation are evicted leaves-first, least recently used first, and recomputed when needed.
//
// Thread-safety: all methods lock the cache; calls from several threads are served one at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backprompt/model.h"
#include "backprompt/snapshot.h"
#include "backprompt/text.h"

namespace backprompt {

enum class TokenizePolicy {
  PER_SEGMENT,  // each segment tokenized on its own, tokens concatenated (BOS and "▁" prefix once)
  JOINED,       // the joined string tokenized as a whole
};

struct CacheOptions {
  uint64_t memory_budget = 2ull << 30;  // bytes of K/V, logits and logprobs held by the tree
  TokenizePolicy policy = TokenizePolicy::PER_SEGMENT;
  bool eager = false;                   // evaluate every Text as soon as it is built
  int32_t max_batch_tokens = 512;       // rows per forward call (bounds activation memory)
  // Persistent store consulted after memory and before computing: "" (none), "dir:PATH[?max_bytes=N]"
  // or "redis://HOST:PORT[/DB]". Newly computed blocks are written behind the computation.
  std::string store;
  int32_t store_block_size = 64;        // tokens per store block
  KvType store_kv_type = KvType::F32;   // K/V at rest in the store (only F32 is exact)
  bool store_zstd = false;              // zstd on top of store_kv_type
};

struct EvalOptions {
  bool logprobs = false;     // also compute per-token logprobs (else only next-token logits)
  size_t logprobs_from = 1;  // tokens before this index need no logprob
};

struct CacheStats {
  uint64_t tokens_computed = 0;    // tokens whose K/V were computed
  uint64_t tokens_reused = 0;      // tokens of evaluated texts served from the tree
  uint64_t tokens_loaded = 0;      // tokens whose K/V came from the store
  uint64_t tokens_recomputed = 0;  // tokens re-run only for outputs missing after a split
  uint64_t n_nodes = 0;            // nodes in the tree now
  uint64_t bytes = 0;              // bytes held now
  uint64_t evictions = 0;          // nodes evicted so far
  uint64_t forward_calls = 0;      // runtime forward() calls so far
};

class Cache {
 public:
  explicit Cache(std::shared_ptr<const Model> model, CacheOptions options = {});
  ~Cache();
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  Text text(std::string s);                    // one string segment
  Text tokens(std::vector<int32_t> ids);       // one token segment (its string is the decoded text)

  // Computes every text's next-token logits (and logprobs if asked) in as few ragged batches as
  // the budget and max_batch_tokens allow. Error(OUT_OF_MEMORY) if one text alone cannot fit.
  void eval(std::span<const Text> texts, const EvalOptions& options = {});

  // Loads a snapshot written by Text::save(): its state goes into the tree (nothing is
  // recomputed) and the result is a text of one token segment whose string is the saved text's.
  // `sampler_state` (optional) receives the saved sampler state. Everything is checked before the
  // cache changes: Error(MODEL_MISMATCH) naming the model or the tokenizer, Error(CORRUPT_FILE)
  // naming the section, Error(IO_ERROR). See snapshot.h.
  Text restore(const std::string& path, SamplingParams* sampler_state = nullptr);

  CacheStats stats() const;
  // Waits until every block queued for the store is written (the destructor does too).
  void flush();
  const Model& model() const;
  const CacheOptions& options() const;

  // Graphviz DOT of how the texts are built from segments and which tree nodes they use
  // (computed, pinned, evicted), with token counts and bytes.
  std::string to_dot(std::span<const Text> texts) const;

 private:
  std::shared_ptr<detail::CacheImpl> impl_;
};

}  // namespace backprompt
