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

const KernelIsa SCALAR = {"scalar",           matvec_scalar,          dequantize_row,
                          attention_tile_portable, silu_mul_portable,  gelu_tanh_portable,
                          rms_norm_row_portable,   layer_norm_row_portable, rotate_pairs_portable,
                          add_to_portable,         nullptr,                 nullptr};

// sum f(x[i]) over i < n in double: eight partial sums, lane k taking x[i + k] (the SIMD tables
// keep them in one vector of 8 doubles), added pairwise at the end.
template <class F>
double sum_double(const float* x, int64_t n, F f) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += f(static_cast<double>(x[i + k]));
  }
  for (; i < n; ++i) acc[0] += f(static_cast<double>(x[i]));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

void rms_norm_row_portable(const float* x, float* y, int64_t n, const float* w, float eps) {
  const double ss = sum_double(x, n, [](double v) { return v * v; });
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

void layer_norm_row_portable(const float* x, float* y, int64_t n, const float* w, const float* b, float eps) {
  const double mean = sum_double(x, n, [](double v) { return v; }) / static_cast<double>(n);
  const double var = sum_double(x, n, [mean](double v) { return (v - mean) * (v - mean); }) / static_cast<double>(n);
  const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
  const float m = static_cast<float>(mean);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * inv * w[i] + b[i];
}

void silu_mul_portable(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void gelu_tanh_portable(float* x, const float* b, int64_t n) {
  constexpr float SQRT_2_OVER_PI = 0.7978845608028654f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = b != nullptr ? x[i] + b[i] : x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v)));
  }
}

void rotate_pairs_portable(float* x, const float* cs, int64_t n_pairs) {
  for (int64_t i = 0; i < n_pairs; ++i) {
    const float c = cs[2 * i], s = cs[2 * i + 1];
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = a * s + b * c;
  }
}

void add_to_portable(float* x, const float* a, const float* b, int64_t n) {
  if (b != nullptr) {
    for (int64_t i = 0; i < n; ++i) x[i] += a[i] + b[i];
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] += a[i];
  }
}

const KernelIsa* kernel_isa_scalar() { return &SCALAR; }

}  // namespace backprompt::detail
