// The forward pass over a ragged batch of spans, each continuing its own chain of K/V.
//
// K/V of a span of n tokens, for one model: K and V are each
//   float [n_layer][n_tokens][kv_dim]        (kv_dim = n_kv_head * head_dim)
// i.e. layer l of a span starts at k + l * n_tokens * kv_dim. Keys are stored after RoPE.
// The runtime reads ancestor K/V where it lies (KvSpanView) and writes the new tokens' K/V
// into buffers the caller owns. It never keeps any state between calls.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "backprompt/model.h"
#include "model/reserved_buffer.h"

namespace backprompt {

struct KvSpanView {
  const float* k = nullptr;  // [n_layer][n_tokens][kv_dim] (layer l at k + l * layer_stride)
  const float* v = nullptr;  // [n_layer][n_tokens][kv_dim]
  int32_t n_tokens = 0;
  int64_t layer_stride = 0;  // floats between layers; 0 means n_tokens * kv_dim
};

enum class LogitsMode { NONE, LAST, ALL };

// One span of new tokens in a batch.
struct ForwardSpan {
  std::span<const KvSpanView> past;   // ancestor spans in order; together positions 0 .. pos0-1
  std::span<const int32_t> tokens;    // the new tokens, at positions pos0 .. pos0+n-1
  int32_t pos0 = 0;                   // must equal the sum of past[i].n_tokens
  float* k_out = nullptr;             // [n_layer][tokens.size()][kv_dim], written
  float* v_out = nullptr;             // [n_layer][tokens.size()][kv_dim], written
  int64_t out_layer_stride = 0;       // floats between layers in k_out/v_out; 0 means n * kv_dim
  LogitsMode logits = LogitsMode::LAST;
  float* logits_out = nullptr;        // LAST: [n_vocab]; ALL: [tokens.size()][n_vocab]; NONE: unused
};

// Runs all spans as one ragged batch (weights are read once for all of them).
// Error(INVALID_ARGUMENT) if a token id is out of range or a position reaches n_ctx.
void forward(const Model& model, std::span<const ForwardSpan> batch);

// One sequence with its own growing, contiguous K/V: the simplest user of forward(), used by
// generation and by tests as the uncached reference path.
// Thread-safety: none.
class Sequence {
 public:
  explicit Sequence(const Model& model);
  // Appends tokens, computing their K/V; returns logits ([n_vocab] for LAST, [n][n_vocab] for ALL).
  std::vector<float> append(std::span<const int32_t> tokens, LogitsMode logits = LogitsMode::LAST);
  // Forgets every token; the K/V memory already committed is kept and written over by the next
  // appends, which then pay no first-touch page faults for it (a loop over prompts, a benchmark's
  // repetitions).
  void clear() { tokens_.clear(); }
  int32_t n_tokens() const { return static_cast<int32_t>(tokens_.size()); }
  const std::vector<int32_t>& tokens() const { return tokens_; }

 private:
  const Model& model_;
  std::vector<int32_t> tokens_;
  // [n_layer][n_ctx][kv_dim] each, filled up to n_tokens(): reserved for the whole context on
  // the first append, committed page by page as tokens arrive, never moved.
  detail::ReservedFloats k_, v_;
};

}  // namespace backprompt
