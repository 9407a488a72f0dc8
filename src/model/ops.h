// Row-wise operations of the transformer blocks, on f32 activations [n_rows][n] (row-major).
// Each parallelises over rows with OpenMP when there are enough of them.
#pragma once

#include <cstdint>

namespace backprompt::ops {

// y = (x - mean) / sqrt(var + eps) * w + b, per row.
void layer_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, const float* b, float eps);
// y = x / sqrt(mean(x^2) + eps) * w, per row.
void rms_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, float eps);
// x[r][i] += b[i]
void add_bias(float* x, int64_t n_rows, int64_t n, const float* b);
// x += y, elementwise over count values.
void add(float* x, const float* y, int64_t count);
// GELU, tanh approximation (GPT-2), in place.
void gelu(float* x, int64_t count);
// gate[i] = silu(gate[i]) * up[i]  (SwiGLU), in place in gate.
void swiglu(float* gate, const float* up, int64_t count);
// Rotates adjacent pairs (x[2i], x[2i+1]) of the first rope_dim dims of every head of one row,
// by angle pos * base^(-2i/rope_dim). x is [n_heads][head_dim].
void rope(float* x, int32_t n_heads, int32_t head_dim, int32_t rope_dim, float base, int32_t pos);

}  // namespace backprompt::ops
