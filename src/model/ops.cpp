#include "model/ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "tensor/kernels.h"

namespace backprompt::ops {

namespace {
constexpr int64_t PARALLEL_ROWS = 4;  // below this, row loops stay on one thread

// sum f(x[i]) over i < n in double, with 8 independent partial sums (one long chain of dependent
// double additions held a 768-wide RMSNorm to one element every ~4 cycles).
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
// Activations: chunks of this many values over the threads, each through the SIMD kernel.
constexpr int64_t ACTIVATION_CHUNK = 1 << 14;
}  // namespace

void layer_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, const float* b, float eps) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const double mean = sum_double(xr, n, [](double v) { return v; }) / static_cast<double>(n);
    const double var = sum_double(xr, n, [mean](double v) { return (v - mean) * (v - mean); }) / static_cast<double>(n);
    const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - m) * inv * w[i] + b[i];
  }
}

void rms_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, float eps) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const double ss = sum_double(xr, n, [](double v) { return v * v; });
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void add(float* x, const float* y, int64_t count) {
#pragma omp parallel for if (count >= (1 << 16) && !omp_in_parallel())
  for (int64_t i = 0; i < count; ++i) x[i] += y[i];
}

void add_residual(float* x, const float* y, int64_t n_rows, int64_t n, const float* b) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t i = 0; i < n; ++i) x[r * n + i] += y[r * n + i] + b[i];
}

void bias_gelu(float* x, int64_t n_rows, int64_t n, const float* b) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) {
    float* xr = x + r * n;
    for (int64_t i = 0; i < n; ++i) xr[i] += b[i];
    gelu_tanh(xr, n);  // while the row is in cache
  }
}

void gelu(float* x, int64_t count) {
  const int64_t n_chunks = (count + ACTIVATION_CHUNK - 1) / ACTIVATION_CHUNK;
#pragma omp parallel for if (n_chunks > 1 && !omp_in_parallel())
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t i = c * ACTIVATION_CHUNK;
    gelu_tanh(x + i, std::min(ACTIVATION_CHUNK, count - i));
  }
}

void swiglu(float* gate, const float* up, int64_t count) {
  const int64_t n_chunks = (count + ACTIVATION_CHUNK - 1) / ACTIVATION_CHUNK;
#pragma omp parallel for if (n_chunks > 1 && !omp_in_parallel())
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t i = c * ACTIVATION_CHUNK;
    silu_mul(gate + i, up + i, std::min(ACTIVATION_CHUNK, count - i));
  }
}

void rope_angles(const int32_t* pos, int64_t n_rows, int32_t rope_dim, float base, float* cs) {
  const int32_t n_pairs = rope_dim / 2;
  std::vector<double> freq(static_cast<size_t>(n_pairs));  // [n_pairs] base^(-2i/rope_dim)
  for (int32_t i = 0; i < n_pairs; ++i) freq[static_cast<size_t>(i)] = std::pow(static_cast<double>(base), -2.0 * i / rope_dim);
#pragma omp parallel for if (n_rows >= 64)
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int32_t i = 0; i < n_pairs; ++i) {
      // Angles in double: positions up to the context length keep full f32 precision.
      const double theta = pos[r] * freq[static_cast<size_t>(i)];
      cs[(r * n_pairs + i) * 2] = static_cast<float>(std::cos(theta));
      cs[(r * n_pairs + i) * 2 + 1] = static_cast<float>(std::sin(theta));
    }
  }
}

void rope(float* x, int32_t n_heads, int32_t head_dim, int32_t rope_dim, const float* cs) {
  rope_range(x, 0, static_cast<int64_t>(n_heads) * head_dim, head_dim, rope_dim, cs);
}

void rope_range(float* x, int64_t e0, int64_t e1, int32_t head_dim, int32_t rope_dim, const float* cs) {
  // Head by head: the elements of [e0, e1) among each head's first rope_dim (pairs never straddle
  // heads: e0 and head_dim are even).
  const int64_t rotated = rope_dim / 2 * 2;
  for (int64_t head0 = e0 / head_dim * head_dim; head0 < e1; head0 += head_dim) {
    float* h = x + head0;
    const int64_t d1 = std::min(e1 - head0, rotated);
    for (int64_t d = std::max<int64_t>(e0 - head0, 0); d < d1; d += 2) {
      const float c = cs[d], s = cs[d + 1];  // pair d / 2: {cos, sin} at cs[d], cs[d + 1]
      const float a = h[d], b = h[d + 1];
      h[d] = a * c - b * s;
      h[d + 1] = a * s + b * c;
    }
  }
}

float* thread_scratch(int slot, size_t n) {
  struct Buffer {
    std::unique_ptr<float[]> data;  // [capacity + 16]: room to align to 64 bytes
    size_t capacity = 0;
  };
  thread_local Buffer buffers[SCRATCH_SLOTS];
  Buffer& b = buffers[slot];
  if (n > b.capacity) {
    b.data.reset();  // free the old one first
    b.data.reset(new float[n + 16]);
    b.capacity = n;
  }
  const uintptr_t at = (reinterpret_cast<uintptr_t>(b.data.get()) + 63) & ~uintptr_t{63};
  return reinterpret_cast<float*>(at);
}

namespace {
thread_local bool in_team_pass = false;
}  // namespace

TeamPass::TeamPass() : saved_(in_team_pass) { in_team_pass = true; }
TeamPass::~TeamPass() { in_team_pass = saved_; }
bool TeamPass::active() { return in_team_pass; }

}  // namespace backprompt::ops
