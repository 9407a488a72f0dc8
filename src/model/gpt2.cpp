// GPT-2: learned position embeddings, pre-LayerNorm blocks with biases, fused QKV, GELU MLP.
//
// Two schedules of the same arithmetic, as in llama.cpp: step by step (prefill, large batches),
// or one parallel region for the whole pass with 5 barriers per layer (decode-sized batches).
#include <omp.h>

#include <algorithm>
#include <iterator>
#include <vector>

#include "model/arch.h"
#include "model/ops.h"

namespace backprompt::detail {

namespace {

// Below this many multiply-adds per layer, the decode schedule runs on one thread.
constexpr int64_t PARALLEL_MIN_LAYER_MACS = 1 << 18;

// Buffers of one pass, shared by the threads: cut from the calling thread's scratch slot 0
// (uninitialised; every element is written before it is read), each 64-byte aligned.
struct Activations {
  Activations(const ModelConfig& c, int64_t n) {
    const int64_t d = c.n_embd, ff = c.n_ff;
    float* hb_floats = nullptr;
    float** parts[] = {&q, &k, &v, &att, &up, &h, &hb_floats};
    const int64_t sizes[] = {n * d, n * d, n * d, n * d, n * ff, n * d, (n * std::max(d, ff) + 1) / 2};
    int64_t total = 0;
    for (int64_t size : sizes) total += (size + 15) / 16 * 16;
    float* p = ops::thread_scratch(0, static_cast<size_t>(total));
    for (size_t i = 0; i < std::size(parts); ++i) {
      *parts[i] = p;
      p += (sizes[i] + 15) / 16 * 16;
    }
    hb = reinterpret_cast<uint16_t*>(hb_floats);
  }
  float* q;    // [n][n_embd], also k and v
  float* k;
  float* v;
  float* att;  // [n][n_embd] attention output
  float* up;   // [n][n_ff]
  float* h;    // [n][n_embd] normalized input, then block outputs (step schedule)
  uint16_t* hb;  // [n][max(n_embd, n_ff)] a product's input as bf16 (step schedule, matmul_takes_bf16)
};

// The fused q/k/v weight's three parts (rows [0, d), [d, 2d), [2d, 3d)) as products into
// out[0..2] ([n][d] each: q, k and v): no copy of a fused [n][3d] output.
struct QkvTargets {
  QkvTargets(const MatrixView& w, float* const* out, int64_t d) {
    for (int64_t p = 0; p < 3; ++p) t[p] = {MatrixView{w.type, w.row(p * d), w.n_in, d}, out[p]};
  }
  MatmulTarget t[3];
};

// The q/k/v bias (bias[3d]) added to columns [rows[p].r0, rows[p].r1) of parts[p] (q, k, v:
// [n][d] each). Parallel over rows unless called inside a parallel region.
void add_qkv_bias(float* const* parts, int64_t n, int64_t d, const RowRange* rows, const float* bias) {
#pragma omp parallel for if (n >= 4 && !omp_in_parallel())
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t p = 0; p < 3; ++p) {
      add_to(parts[p] + j * d + rows[p].r0, bias + p * d + rows[p].r0, nullptr, rows[p].r1 - rows[p].r0);
    }
  }
}

void hidden_steps(const ModelImpl& m, const Batch& b, float* x, Activations& a) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff;
  float* h = a.h;
  uint16_t* hb = matmul_takes_bf16(n) ? a.hb : nullptr;  // products' inputs as bf16
  for (int32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& L = m.layers[static_cast<size_t>(il)];
    // h: the previous layer's MLP output, added to x (with its bias) here
    const float* prev_bias = il == 0 ? nullptr : m.layers[static_cast<size_t>(il - 1)].ffn_down_b.data();
    const KvRows kv_new = kv_rows(b, il, a.k, a.v);  // in place in a batch of one span
    float* const qkv_out[3] = {a.q, kv_new.k, kv_new.v};
    const QkvTargets qkv(L.attn_qkv, qkv_out, d);
    ops::add_norm_products(x, il == 0 ? nullptr : h, prev_bias, {L.attn_norm_w.data(), L.attn_norm_b.data(), c.norm_eps},
                           qkv.t, h, hb, n, d);
    const RowRange all[3] = {{0, d}, {0, d}, {0, d}};
    add_qkv_bias(qkv_out, n, d, all, L.attn_qkv_b.data());
    store_kv(b, il, kv_new);
    attention(b, il, a.q, a.att);
    matmul(L.attn_out, a.att, n, h);

    const MatmulTarget up[] = {{L.ffn_up, a.up}};
    ops::add_norm_products(x, h, L.attn_out_b.data(), {L.ffn_norm_w.data(), L.ffn_norm_b.data(), c.norm_eps}, up, h, hb, n, d);
    if (hb != nullptr) {
      ops::bias_gelu(a.up, n, ff, L.ffn_up_b.data(), hb);
      const MatmulTarget down[] = {{L.ffn_down, h}};
      matmul_many_bf16(down, hb, n);
    } else {
      ops::bias_gelu(a.up, n, ff, L.ffn_up_b.data());
      matmul(L.ffn_down, a.up, n, h);
    }
  }
  if (c.n_layer > 0) ops::add_residual(x, h, n, d, m.layers.back().ffn_down_b.data());  // the last layer's MLP output
}

// x[j][r] += y[j][r] + bias[r] for columns r in [cols.r0, cols.r1) of [n][ld] rows.
void add_residual_columns(float* x, const float* y, const float* bias, int64_t n, int64_t ld, const RowRange& cols) {
  for (int64_t j = 0; j < n; ++j) {
    add_to(x + j * ld + cols.r0, y + j * ld + cols.r0, bias + cols.r0, cols.r1 - cols.r0);
  }
}

void hidden_team(const ModelImpl& m, const Batch& b, float* x, Activations& a) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff;
  const int64_t layer_macs = n * (4 * d * d + 2 * d * ff);
  ops::TeamBarrier barrier;  // where the team meets (shared)
#pragma omp parallel if (layer_macs >= PARALLEL_MIN_LAYER_MACS)
  {
    const ops::TeamPass team(barrier);  // store_kv and attention below are shared by the team
    const int t = omp_get_thread_num(), n_threads = omp_get_num_threads();
    float* h = ops::thread_scratch(1, static_cast<size_t>(2 * n * d));  // [n][d] this thread's normalized input
    float* y = h + n * d;                                               // [n][d] its share of a block output
    RowRange rows[3];
    for (int32_t il = 0; il < c.n_layer; ++il) {
      const LayerWeights& L = m.layers[static_cast<size_t>(il)];
      // x is complete here (after a barrier): every thread normalizes it for itself.
      ops::layer_norm(x, h, n, d, L.attn_norm_w.data(), L.attn_norm_b.data(), c.norm_eps);
      const KvRows kv_new = kv_rows(b, il, a.k, a.v);
      float* const qkv_out[3] = {a.q, kv_new.k, kv_new.v};
      const QkvTargets qkv(L.attn_qkv, qkv_out, d);
      matmul_many_part(qkv.t, h, n, t, n_threads, rows);
      add_qkv_bias(qkv_out, n, d, rows, L.attn_qkv_b.data());
      barrier.wait(n_threads);
      store_kv(b, il, kv_new);       // shared by the team, then a barrier (none if in place)
      attention(b, il, a.q, a.att);  // shared by the team, then a barrier
      const MatmulTarget out[] = {{L.attn_out, y}};
      matmul_many_part(out, a.att, n, t, n_threads, rows);
      add_residual_columns(x, y, L.attn_out_b.data(), n, d, rows[0]);
      barrier.wait(n_threads);

      ops::layer_norm(x, h, n, d, L.ffn_norm_w.data(), L.ffn_norm_b.data(), c.norm_eps);
      const MatmulTarget up[] = {{L.ffn_up, a.up}};
      matmul_many_part(up, h, n, t, n_threads, rows);
      for (int64_t r = 0; r < n; ++r) gelu_tanh(a.up + r * ff + rows[0].r0, L.ffn_up_b.data() + rows[0].r0, rows[0].r1 - rows[0].r0);
      barrier.wait(n_threads);
      const MatmulTarget down[] = {{L.ffn_down, y}};
      matmul_many_part(down, a.up, n, t, n_threads, rows);
      add_residual_columns(x, y, L.ffn_down_b.data(), n, d, rows[0]);
      barrier.wait(n_threads);
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
