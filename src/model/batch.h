// A ragged batch in flight: the rows of all spans laid end to end, with their positions, and
// the attention that lets each span see its own ancestor chain plus itself, causally.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/runtime.h"

namespace backprompt::detail {

struct Batch {
  Batch(const ModelConfig& cfg, std::span<const ForwardSpan> spans);
  const ModelConfig& cfg;
  std::span<const ForwardSpan> spans;
  std::vector<int64_t> row0;    // [n_spans + 1]: rows of span s are row0[s] .. row0[s+1]-1
  std::vector<int32_t> pos;     // [n_rows]: position of each row
  std::vector<int32_t> tokens;  // [n_rows]: token of each row
  int64_t n_rows = 0;
};

// Copies this layer's new K and V rows ([n_rows][kv_dim], keys after RoPE) into each span's
// k_out / v_out.
void store_kv(const Batch& b, int32_t layer, const float* k, const float* v);

// Where this layer's new K rows (which == 0) or V rows (1) already lie as one [n_rows][kv_dim]
// matrix: in a batch of one span, its own k_out / v_out for the layer. A pass whose products
// write K and V there has nothing to store (store_kv not called). nullptr for other batches.
float* kv_in_place(const Batch& b, int32_t layer, int which);

// out[n_rows][n_head * head_dim] = softmax(q Kᵀ / sqrt(head_dim)) V per head, where the keys of a
// row are its span's ancestors followed by the span's own rows up to itself. Reads the span's own
// K/V from k_out / v_out, so they must be there for this layer: stored by store_kv, or written in
// place by the products (kv_in_place).
void attention(const Batch& b, int32_t layer, const float* q, float* out);

}  // namespace backprompt::detail
