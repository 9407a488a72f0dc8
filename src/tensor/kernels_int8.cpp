// DecodePrecision (kernels.h): the process-wide setting, and the activations' quantization that
// its INT8 products start from (the products themselves: kernels_int8_avx512.cpp).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string_view>

#include "backprompt/error.h"
#include "tensor/kernels_simd.h"

namespace backprompt {

namespace detail {

namespace {

std::atomic<DecodePrecision>& decode_current() {
  static std::atomic<DecodePrecision> current{[] {
    const char* env = std::getenv("BACKPROMPT_DECODE");
    return env != nullptr && std::string_view(env) == "int8" ? DecodePrecision::INT8 : DecodePrecision::EXACT;
  }()};
  return current;
}

// One block of Q8_0_BLOCK values: its scale, and u = q + 128.
float quantize_block(const float* x, uint8_t* u) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < Q8_0_BLOCK; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::abs(x[i]));
  }
  if (!finite || amax == 0.0f) {
    for (int i = 0; i < Q8_0_BLOCK; ++i) u[i] = 128;
    return finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = 127.0f / amax;
  for (int i = 0; i < Q8_0_BLOCK; ++i) {
    // |x inv| <= 127 up to rounding; nearbyint rounds ties to even (the default rounding mode).
    const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] * inv)));
    u[i] = static_cast<uint8_t>(static_cast<int>(q) + 128);
  }
  return amax / 127.0f;
}

}  // namespace

DecodePrecision decode_precision() { return decode_current().load(std::memory_order_relaxed); }

int64_t QuantizedRows::reset(int64_t rows, int64_t row_size) {
  BP_ASSERT(rows >= 0 && row_size >= 0 && row_size % Q8_0_BLOCK == 0);
  const int64_t n_blocks = row_size / Q8_0_BLOCK;
  u.resize(static_cast<size_t>(rows * row_size));
  d.resize(static_cast<size_t>(rows * n_blocks));
  n = rows;
  n_in = row_size;
  return n_blocks;
}

void quantize_rows_q8(const float* x, int64_t n, int64_t n_in, QuantizedRows& out) {
  const int64_t n_blocks = out.reset(n, n_in);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t at = j * n_in + b * Q8_0_BLOCK;
      out.d[static_cast<size_t>(j * n_blocks + b)] = quantize_block(x + at, out.u.data() + at);
    }
  }
}

}  // namespace detail

void kernels_set_decode_precision(DecodePrecision p) { detail::decode_current().store(p, std::memory_order_relaxed); }

DecodePrecision kernels_decode_precision() { return detail::decode_precision(); }

bool kernels_int8_native() { return detail::kernel_isa().matvec_q8_int8 != nullptr; }

}  // namespace backprompt
