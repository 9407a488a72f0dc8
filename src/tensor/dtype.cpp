// Element types: names, block layouts, and the portable (scalar) conversions to and from f32.
//
// Everything here is plain C++ with no target-specific instructions, so it runs on any CPU.
// The SIMD paths in kernels_avx2.cpp / kernels_avx512.cpp must give bit-identical results;
// tests/test_kernels.cpp checks that.
#include "tensor/dtype.h"

#include <cmath>
#include <cstring>

#include "backprompt/error.h"

namespace backprompt {

namespace {

uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

bool dtype_is_supported(uint32_t id) {
  switch (static_cast<DType>(id)) {
    case DType::F32:
    case DType::F16:
    case DType::Q8_0:
    case DType::BF16: return true;
  }
  return false;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::Q8_0: return "q8_0";
    case DType::BF16: return "bf16";
  }
  return "unknown";
}

std::optional<DType> dtype_from_name(std::string_view s) {
  for (DType t : {DType::F32, DType::F16, DType::Q8_0, DType::BF16}) {
    if (s == dtype_name(t)) return t;
  }
  return std::nullopt;
}

int dtype_block_size(DType t) {
  switch (t) {
    case DType::F32:
    case DType::F16:
    case DType::BF16: return 1;
    case DType::Q8_0: return Q8_0_BLOCK;
  }
  BP_ASSERT(false && "unknown dtype");
  return 1;
}

size_t dtype_block_bytes(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
    case DType::Q8_0: return sizeof(BlockQ8_0);
  }
  BP_ASSERT(false && "unknown dtype");
  return 0;
}

// ---------------------------------------------------------------------------------------------
// f16 (IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits)

float f16_to_f32(uint16_t h) {
  // Move exponent and mantissa into f32 position, then rebias the exponent (15 -> 127).
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t bits = static_cast<uint32_t>(h & 0x7fff) << 13;
  const uint32_t exp = bits & 0x0f800000;  // the f16 exponent field, shifted
  bits += (127 - 15) << 23;
  if (exp == 0x0f800000) {
    bits += (128 - 16) << 23;  // inf / NaN: exponent all ones, mantissa (payload) kept
    if (bits & 0x007fffff) bits |= 0x00400000;  // NaN made quiet, as F16C does
  } else if (exp == 0) {
    // Zero or subnormal: m * 2^-24. Add an implicit one and subtract it again as a float, which
    // normalises exactly (both values are representable).
    bits += 1 << 23;
    return f32_from_bits(sign | f32_bits(f32_from_bits(bits) - f32_from_bits(113u << 23)));
  }
  return f32_from_bits(sign | bits);
}

uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  uint32_t a = x & 0x7fffffff;
  if (a >= 0x7f800000) {  // inf or NaN (NaN stays NaN, made quiet like F16C does)
    if (a == 0x7f800000) return sign | 0x7c00;
    return static_cast<uint16_t>(sign | 0x7e00 | ((a >> 13) & 0x3ff));
  }
  if (a >= 0x477ff000) return sign | 0x7c00;  // >= 65520 rounds to inf (65504 is the largest)
  if (a < 0x38800000) {
    // Below the smallest normal f16 (2^-14): the result is subnormal or zero, a multiple of
    // 2^-24. Adding 0.5 (whose f32 ulp is 2^-24) rounds to nearest even in hardware.
    const float r = f32_from_bits(a) + 0.5f;
    return static_cast<uint16_t>(sign | (f32_bits(r) - f32_bits(0.5f)));
  }
  // Normal: rebias exponent and round the 13 dropped mantissa bits to nearest even. A carry out
  // of the mantissa correctly bumps the exponent (and 65504 + ulp/2 was handled above).
  const uint32_t odd = (a >> 13) & 1;
  a += (static_cast<uint32_t>(15 - 127) << 23) + 0x0fff + odd;
  return static_cast<uint16_t>(sign | (a >> 13));
}

// ---------------------------------------------------------------------------------------------
// bf16 (the top 16 bits of an f32)

float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x0040);  // quiet NaN
  const uint32_t odd = (x >> 16) & 1;
  return static_cast<uint16_t>((x + 0x7fff + odd) >> 16);  // overflow rounds to inf, as it should
}

// ---------------------------------------------------------------------------------------------
// Rows

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  BP_ASSERT(n >= 0 && n % dtype_block_size(t) == 0);
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::F16: {
      const auto* s = static_cast<const uint16_t*>(src);  // [n]
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);  // [n]
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::Q8_0: {
      const auto* blocks = static_cast<const BlockQ8_0*>(src);  // [n / 32]
      for (int64_t b = 0; b < n / Q8_0_BLOCK; ++b) {
        const float d = f16_to_f32(blocks[b].d);
        for (int i = 0; i < Q8_0_BLOCK; ++i) dst[b * Q8_0_BLOCK + i] = d * blocks[b].q[i];
      }
      return;
    }
  }
  BP_ASSERT(false && "unknown dtype");
}

void quantize_row(DType t, const float* src, void* dst, int64_t n) {
  BP_ASSERT(n >= 0 && n % dtype_block_size(t) == 0);
  if (n == 0) return;  // src/dst may be null
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::F16: {
      auto* d = static_cast<uint16_t*>(dst);  // [n]
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);  // [n]
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::Q8_0: {
      // As GGUF's reference quantizer: d = max|x| / 127, q = round(x / d) (half away from zero),
      // d stored as f16. An all-zero block gets d = 0, q = 0.
      auto* blocks = static_cast<BlockQ8_0*>(dst);  // [n / 32]
      for (int64_t b = 0; b < n / Q8_0_BLOCK; ++b) {
        const float* x = src + b * Q8_0_BLOCK;  // [32]
        float amax = 0.0f;
        for (int i = 0; i < Q8_0_BLOCK; ++i) amax = std::fmax(amax, std::fabs(x[i]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        blocks[b].d = f32_to_f16(d);
        for (int i = 0; i < Q8_0_BLOCK; ++i) {
          // A non-finite input has no meaningful quantization; clamp so the cast stays defined.
          const float q = std::round(x[i] * id);
          blocks[b].q[i] = static_cast<int8_t>(std::isnan(q) ? 0.0f : std::fmin(127.0f, std::fmax(-127.0f, q)));
        }
      }
      return;
    }
  }
  BP_ASSERT(false && "unknown dtype");
}

}  // namespace backprompt
