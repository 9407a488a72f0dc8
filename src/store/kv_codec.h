// K/V at rest: a run of f32 values stored as f32, f16, bf16 or q8_0 (block-scaled int8), with
// optional zstd on top. Used by snapshots and by store blocks. Exactness holds for F32 only;
// the other types are opt-in and their error is measured (README).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "tensor/dtype.h"

namespace backprompt {

struct KvCodec {
  DType type = DType::F32;
  bool zstd = false;
};

// Appends the encoding of `values` to `out`. Q8_0 pads the last block with zeros.
void kv_encode(const KvCodec& codec, std::span<const float> values, std::vector<uint8_t>& out);
// Decodes exactly out.size() values from `bytes` (all of it). Error(CORRUPT_FILE) naming `what`
// if the bytes are not a valid encoding of that many values.
void kv_decode(const KvCodec& codec, std::span<const uint8_t> bytes, std::span<float> out, const char* what);

}  // namespace backprompt
