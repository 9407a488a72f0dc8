// Element types of weights and of K/V at rest, with GGUF's numbering and block layouts.
//
// A row of n elements of a blocked type is n / block_size blocks laid end to end.
// Q8_0 (GGUF's layout): a block of 32 values = { f16 scale d; int8 q[32]; } (34 bytes),
// value_i = d * q_i.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "backprompt/error.h"

namespace backprompt {

enum class DType : uint32_t {  // values are GGUF's ggml_type ids
  F32 = 0,
  F16 = 1,
  Q8_0 = 8,
  BF16 = 30,
};

constexpr int Q8_0_BLOCK = 32;

struct BlockQ8_0 {
  uint16_t d;  // f16 scale
  int8_t q[Q8_0_BLOCK];
};
static_assert(sizeof(BlockQ8_0) == 34);

// Is `id` a GGUF type id that backprompt can read?
bool dtype_is_supported(uint32_t id);
const char* dtype_name(DType t);                          // "f32", "f16", "bf16", "q8_0"
std::optional<DType> dtype_from_name(std::string_view s);  // inverse of dtype_name
int dtype_block_size(DType t);                            // elements per block (1 or 32)
size_t dtype_block_bytes(DType t);                        // bytes per block
// Bytes of a row of n elements; n must be a multiple of the block size (BP_ASSERT). Inline:
// decode kernels ask for it per row (MatrixView::row), and out of line it was 0.5-0.75% of a
// small model's decode profile (llama-110m q8_0 decode 1.03x after, 6 of 8 alternating pairs).
inline size_t dtype_row_bytes(DType t, int64_t n) {
  BP_ASSERT(n >= 0);
  switch (t) {
    case DType::F32: return static_cast<size_t>(n) * 4;
    case DType::F16:
    case DType::BF16: return static_cast<size_t>(n) * 2;
    case DType::Q8_0:
      BP_ASSERT(n % Q8_0_BLOCK == 0);
      return static_cast<size_t>(n / Q8_0_BLOCK) * sizeof(BlockQ8_0);
  }
  BP_ASSERT(false && "unknown dtype");
  return 0;
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);   // round to nearest even
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // round to nearest even

// Convert a row of n elements of type t (n a multiple of the block size) to/from f32.
void dequantize_row(DType t, const void* src, float* dst, int64_t n);
void quantize_row(DType t, const float* src, void* dst, int64_t n);

}  // namespace backprompt
