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

// Where a layer's products write the batch's new K and V rows ([n_rows][kv_dim] each): in a batch
// of one span, straight into its k_out / v_out for the layer (in_place); otherwise into the
// given scratch, from which store_kv copies them into each span's k_out / v_out.
struct KvRows {
  float* k;
  float* v;
  bool in_place;
};
KvRows kv_rows(const Batch& b, int32_t layer, float* k_scratch, float* v_scratch);

// Copies this layer's new K and V rows (keys after RoPE) into each span's k_out / v_out; nothing
// to do where they were written in place.
void store_kv(const Batch& b, int32_t layer, const KvRows& rows);

// out[n_rows][n_head * head_dim] = softmax(q Kᵀ / sqrt(head_dim)) V per head, where the keys of a
// row are its span's ancestors followed by the span's own rows up to itself. Reads the span's own
// K/V from k_out / v_out, so store_kv must have run for this layer.
void attention(const Batch& b, int32_t layer, const float* q, float* out);

}  // namespace backprompt::detail
