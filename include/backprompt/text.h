// backprompt::Text: an immutable prompt built by concatenation, whose outputs come from a Cache.
//
// A Text is a list of segments (string pieces, or token pieces made by generate()). Building
// Texts costs no model work: `a + b` copies a few pointers. Outputs are computed on first
// access (or all at once by Cache::eval) and only for tokens whose K/V are not cached yet.
//
// Lifetime: a Text keeps its cache alive (shared ownership); copying a Text is cheap.
// Thread-safety: Texts are immutable values; their output methods lock the cache, so they may be
// called from several threads (they are then served one at a time).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backprompt/sampling.h"
#include "backprompt/snapshot.h"

namespace backprompt {

namespace detail {
struct CacheImpl;
struct Segment;
}

// Where tokenizing segments one by one differs from tokenizing the joined string.
struct Seam {
  size_t segment = 0;                   // the seam lies between segment-1 and segment
  size_t byte_offset = 0;               // in string()
  std::vector<int32_t> segment_tokens;  // tokens around the seam, per-segment policy
  std::vector<int32_t> joined_tokens;   // tokens around the seam, joined policy
};

class Text {
 public:
  Text() = default;  // an empty text belonging to no cache; outputs throw INVALID_ARGUMENT

  std::string string() const;                 // the segments joined
  std::vector<std::string> segments() const;  // the pieces, in order
  std::vector<int32_t> tokens() const;        // by the cache's policy; BOS first if the model adds it
  size_t n_tokens() const { return tokens().size(); }

  // Logits [n_vocab] for the token after the text. Error(INVALID_ARGUMENT) for a text with no tokens.
  std::vector<float> next_logits() const;
  // log p(token_i | tokens before it) for i = begin .. n_tokens-1 (begin >= 1: the first token
  // has no prediction).
  std::vector<float> logprobs(size_t begin = 1) const;
  // Continues the text by up to n tokens (stops after EOS, or when on_token returns false). The
  // result's last segment holds the generated tokens; their K/V are in the cache. Deterministic
  // for a given seed. on_token (optional) sees each token as soon as it is chosen. If
  // `rng_state_out` is given, it receives the sampler's stream position at the end (to resume).
  Text generate(int32_t n, const SamplingParams& sampling = {},
                const std::function<bool(int32_t token)>& on_token = {}, uint64_t* rng_state_out = nullptr) const;

  // Writes a snapshot of this text (evaluating it first; logprobs are saved where already
  // computed, NaN elsewhere) to `path`, atomically (see snapshot.h). Error(IO_ERROR) on failure,
  // Error(INVALID_ARGUMENT) for a text with no tokens.
  void save(const std::string& path, const SnapshotOptions& options = {}) const;

  // Keeps this text's nodes from eviction (counted: every pin needs an unpin).
  void pin() const;
  void unpin() const;

  // Seams where the per-segment and joined tokenizations disagree.
  std::vector<Seam> seam_report() const;

  friend Text operator+(const Text& a, const Text& b);
  friend Text operator+(const Text& a, std::string_view b);
  friend Text operator+(std::string_view a, const Text& b);

  // Internal: used by Cache.
  Text(std::shared_ptr<detail::CacheImpl> cache, std::shared_ptr<const std::vector<std::shared_ptr<const detail::Segment>>> segs);
  const std::shared_ptr<detail::CacheImpl>& cache_impl() const { return cache_; }
  const std::vector<std::shared_ptr<const detail::Segment>>& segment_list() const;

 private:
  std::shared_ptr<detail::CacheImpl> cache_;
  std::shared_ptr<const std::vector<std::shared_ptr<const detail::Segment>>> segs_;
};

}  // namespace backprompt
