// GPT-2: learned position embeddings, pre-LayerNorm blocks with biases, fused QKV, GELU MLP.
//
// Two schedules of the same arithmetic, as in llama.cpp: step by step (prefill, large batches),
// or one parallel region for the whole pass with 5 barriers per layer (decode-sized batches).
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "model/arch.h"
#include "model/ops.h"

namespace backprompt::detail {

namespace {

// An uninitialised f32 buffer (every element is written before it is read).
std::unique_ptr<float[]> buffer(int64_t n) { return std::unique_ptr<float[]>(new float[static_cast<size_t>(n)]); }

// Below this many multiply-adds per layer, the decode schedule runs on one thread.
constexpr int64_t PARALLEL_MIN_LAYER_MACS = 1 << 18;

// Buffers of one pass, shared by the threads.
struct Activations {
  Activations(const ModelConfig& c, int64_t n)
      : qkv(buffer(n * 3 * c.n_embd)), q(buffer(n * c.n_embd)), k(buffer(n * c.n_embd)), v(buffer(n * c.n_embd)),
        att(buffer(n * c.n_embd)), up(buffer(n * c.n_ff)) {}
  std::unique_ptr<float[]> qkv;  // [n][3 * n_embd]
  std::unique_ptr<float[]> q;    // [n][n_embd], also k and v
  std::unique_ptr<float[]> k;
  std::unique_ptr<float[]> v;
  std::unique_ptr<float[]> att;  // [n][n_embd] attention output
  std::unique_ptr<float[]> up;   // [n][n_ff]
};

// Columns [cols.r0, cols.r1) of the fused qkv output ([n][3d], bias added) into q, k and v ([n][d]).
void split_qkv(const Activations& a, int64_t n, int64_t d, const RowRange& cols) {
  float* parts[3] = {a.q.get(), a.k.get(), a.v.get()};
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = cols.r0; r < cols.r1;) {
      const int64_t part = r / d, end = std::min(cols.r1, (part + 1) * d);
      std::memcpy(parts[part] + j * d + (r - part * d), a.qkv.get() + j * 3 * d + r, static_cast<size_t>(end - r) * sizeof(float));
      r = end;
    }
  }
}

void hidden_steps(const ModelImpl& m, const Batch& b, float* x, Activations& a) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff;
  const auto h = buffer(n * d);  // [n][d] normalized input, then block outputs
  for (int32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& L = m.layers[static_cast<size_t>(il)];
    ops::layer_norm(x, h.get(), n, d, L.attn_norm_w.data(), L.attn_norm_b.data(), c.norm_eps);
    matmul(L.attn_qkv, h.get(), n, a.qkv.get());
    ops::add_bias(a.qkv.get(), n, 3 * d, L.attn_qkv_b.data());
    split_qkv(a, n, d, {0, 3 * d});
    store_kv(b, il, a.k.get(), a.v.get());
    attention(b, il, a.q.get(), a.att.get());
    matmul(L.attn_out, a.att.get(), n, h.get());
    ops::add_bias(h.get(), n, d, L.attn_out_b.data());
    ops::add(x, h.get(), n * d);

    ops::layer_norm(x, h.get(), n, d, L.ffn_norm_w.data(), L.ffn_norm_b.data(), c.norm_eps);
    matmul(L.ffn_up, h.get(), n, a.up.get());
    ops::add_bias(a.up.get(), n, ff, L.ffn_up_b.data());
    ops::gelu(a.up.get(), n * ff);
    matmul(L.ffn_down, a.up.get(), n, h.get());
    ops::add_bias(h.get(), n, d, L.ffn_down_b.data());
    ops::add(x, h.get(), n * d);
  }
}

// y[j][r] += bias[r] for columns r in [cols.r0, cols.r1) of [n][ld] rows.
void add_bias_columns(float* y, const float* bias, int64_t n, int64_t ld, const RowRange& cols) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = cols.r0; r < cols.r1; ++r) y[j * ld + r] += bias[r];
  }
}

// x[j][r] += y[j][r] + bias[r] for columns r in [cols.r0, cols.r1) of [n][ld] rows.
void add_residual_columns(float* x, const float* y, const float* bias, int64_t n, int64_t ld, const RowRange& cols) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = cols.r0; r < cols.r1; ++r) x[j * ld + r] += y[j * ld + r] + bias[r];
  }
}

void hidden_team(const ModelImpl& m, const Batch& b, float* x, Activations& a) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff;
  const int64_t layer_macs = n * (4 * d * d + 2 * d * ff);
#pragma omp parallel if (layer_macs >= PARALLEL_MIN_LAYER_MACS)
  {
    const int t = omp_get_thread_num(), n_threads = omp_get_num_threads();
    const auto h = buffer(n * d);  // [n][d] this thread's copy of the normalized input
    const auto y = buffer(n * d);  // [n][d] this thread's share of a block output
    RowRange rows[1];
    for (int32_t il = 0; il < c.n_layer; ++il) {
      const LayerWeights& L = m.layers[static_cast<size_t>(il)];
      // x is complete here (after a barrier): every thread normalizes it for itself.
      ops::layer_norm(x, h.get(), n, d, L.attn_norm_w.data(), L.attn_norm_b.data(), c.norm_eps);
      const MatmulTarget qkv[] = {{L.attn_qkv, a.qkv.get()}};
      matmul_many_part(qkv, h.get(), n, t, n_threads, rows);
      add_bias_columns(a.qkv.get(), L.attn_qkv_b.data(), n, 3 * d, rows[0]);
      split_qkv(a, n, d, rows[0]);
#pragma omp barrier
      store_kv(b, il, a.k.get(), a.v.get());       // shared by the team, then a barrier
      attention(b, il, a.q.get(), a.att.get());    // shared by the team, then a barrier
      const MatmulTarget out[] = {{L.attn_out, y.get()}};
      matmul_many_part(out, a.att.get(), n, t, n_threads, rows);
      add_residual_columns(x, y.get(), L.attn_out_b.data(), n, d, rows[0]);
#pragma omp barrier

      ops::layer_norm(x, h.get(), n, d, L.ffn_norm_w.data(), L.ffn_norm_b.data(), c.norm_eps);
      const MatmulTarget up[] = {{L.ffn_up, a.up.get()}};
      matmul_many_part(up, h.get(), n, t, n_threads, rows);
      add_bias_columns(a.up.get(), L.ffn_up_b.data(), n, ff, rows[0]);
      for (int64_t r = 0; r < n; ++r) gelu_tanh(a.up.get() + r * ff + rows[0].r0, rows[0].r1 - rows[0].r0);
#pragma omp barrier
      const MatmulTarget down[] = {{L.ffn_down, y.get()}};
      matmul_many_part(down, a.up.get(), n, t, n_threads, rows);
      add_residual_columns(x, y.get(), L.ffn_down_b.data(), n, d, rows[0]);
#pragma omp barrier
    }
  }
}

}  // namespace

void gpt2_hidden(const ModelImpl& m, const Batch& b, float* x) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd;
  std::vector<float> pe(static_cast<size_t>(d));  // [d] position embedding of one row
  for (int64_t r = 0; r < n; ++r) {
    matrix_get_row(m.token_embd, b.tokens[static_cast<size_t>(r)], x + r * d);
    matrix_get_row(m.position_embd, b.pos[static_cast<size_t>(r)], pe.data());
    ops::add(x + r * d, pe.data(), d);
  }
  Activations a(c, n);
  if (n <= MATMUL_FUSED_MAX_N) {
    hidden_team(m, b, x, a);
  } else {
    hidden_steps(m, b, x, a);
  }
  ops::layer_norm(x, x, n, d, m.output_norm_w.data(), m.output_norm_b.data(), c.norm_eps);
}

}  // namespace backprompt::detail
