// The portable kernel table: plain C++ for any CPU, and the reference the SIMD tables are
// tested against. Each weight row is dequantized once into a thread-local buffer, then dotted
// with every activation row.
#include <cmath>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/kernels_simd.h"

namespace backprompt::detail {

namespace {

// Eight partial sums, so that the compiler may keep them in two SSE registers.
float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int i = 0; i < 8; ++i) acc[i] += a[k + i] * b[k + i];
  }
  for (; k < n; ++k) acc[0] += a[k] * b[k];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void matvec_scalar(const MatrixView& w, const float* x, int64_t n, float* y, int64_t r0, int64_t r1) {
  thread_local std::vector<float> row;  // [n_in]
  row.resize(static_cast<size_t>(w.n_in));
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = row.data();
    if (w.type == DType::F32) {
      wr = reinterpret_cast<const float*>(w.row(r));
    } else {
      dequantize_row(w.type, w.row(r), row.data(), w.n_in);
    }
    for (int64_t j = 0; j < n; ++j) y[j * w.n_out + r] = dot_scalar(wr, x + j * w.n_in, w.n_in);
  }
}

const KernelIsa SCALAR = {"scalar", matvec_scalar, dequantize_row, attention_tile_portable, silu_mul_portable,
                          gelu_tanh_portable, nullptr, nullptr};

}  // namespace

void silu_mul_portable(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void gelu_tanh_portable(float* x, int64_t n) {
  constexpr float SQRT_2_OVER_PI = 0.7978845608028654f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v)));
  }
}

const KernelIsa* kernel_isa_scalar() { return &SCALAR; }

}  // namespace backprompt::detail
