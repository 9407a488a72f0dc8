#include "model/ops.h"

#include <cmath>

namespace backprompt::ops {

namespace {
constexpr int64_t PARALLEL_ROWS = 4;  // below this, row loops stay on one thread
}

void layer_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, const float* b, float eps) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += xr[i];
    mean /= static_cast<double>(n);
    double var = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = xr[i] - mean;
      var += d * d;
    }
    var /= static_cast<double>(n);
    const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - m) * inv * w[i] + b[i];
  }
}

void rms_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, float eps) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void add_bias(float* x, int64_t n_rows, int64_t n, const float* b) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS)
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t i = 0; i < n; ++i) x[r * n + i] += b[i];
}

void add(float* x, const float* y, int64_t count) {
#pragma omp parallel for if (count >= (1 << 16))
  for (int64_t i = 0; i < count; ++i) x[i] += y[i];
}

void gelu(float* x, int64_t count) {
  constexpr float SQRT_2_OVER_PI = 0.7978845608028654f;
#pragma omp parallel for if (count >= (1 << 16))
  for (int64_t i = 0; i < count; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v)));
  }
}

void swiglu(float* gate, const float* up, int64_t count) {
#pragma omp parallel for if (count >= (1 << 16))
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void rope(float* x, int32_t n_heads, int32_t head_dim, int32_t rope_dim, float base, int32_t pos) {
  for (int32_t i = 0; i < rope_dim / 2; ++i) {
    // Angles in double: positions up to the context length keep full f32 precision.
    const double theta = pos * std::pow(static_cast<double>(base), -2.0 * i / rope_dim);
    const float c = static_cast<float>(std::cos(theta)), s = static_cast<float>(std::sin(theta));
    for (int32_t h = 0; h < n_heads; ++h) {
      float* p = x + static_cast<int64_t>(h) * head_dim + 2 * i;
      const float a = p[0], b = p[1];
      p[0] = a * c - b * s;
      p[1] = a * s + b * c;
    }
  }
}

}  // namespace backprompt::ops
