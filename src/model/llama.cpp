// Llama: RMSNorm, RoPE on adjacent pairs, grouped-query attention, SwiGLU MLP, no biases.
//
// Two schedules of the same arithmetic:
//   prefill and large batches: one step after another, each parallel on its own (GEMMs);
//   decode-sized batches (at most MATMUL_FUSED_MAX_N rows): one parallel region for the whole
//     pass. Each thread computes its share of every matrix's output rows (and the row-wise work
//     on them), and the threads meet at 5 barriers per layer instead of forking and joining a
//     team for each of 5 products (a team wake-up costs ~20 us with OMP_WAIT_POLICY=passive, a
//     barrier about half; measured on a 2-core AVX-512 machine). The barriers, and those of
//     store_kv and attention inside the pass, are the team's own (ops::TeamBarrier).
#include <omp.h>

#include <algorithm>
#include <iterator>

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
    const int64_t d = c.n_embd, kv = c.kv_dim(), ff = c.n_ff, rot_n = c.rope_dim / 2 * 2;
    float* hb_floats = nullptr;
    float** parts[] = {&q, &k, &v, &att, &gate, &up, &rot, &h, &hb_floats};
    const int64_t sizes[] = {n * d, n * kv, n * kv, n * d, n * ff, n * ff, n * rot_n, n * d, (n * std::max(d, ff) + 1) / 2};
    int64_t total = 0;
    for (int64_t size : sizes) total += (size + 15) / 16 * 16;
    float* p = ops::thread_scratch(0, static_cast<size_t>(total));
    for (size_t i = 0; i < std::size(parts); ++i) {
      *parts[i] = p;
      p += (sizes[i] + 15) / 16 * 16;
    }
    hb = reinterpret_cast<uint16_t*>(hb_floats);
  }
  float* q;     // [n][n_head][head_dim]
  float* k;     // [n][n_kv_head][head_dim]
  float* v;     // [n][n_kv_head][head_dim]
  float* att;   // [n][n_embd] attention output
  float* gate;  // [n][n_ff]
  float* up;    // [n][n_ff]
  float* rot;   // [n][rope_dim / 2][cos, sin]
  float* h;     // [n][n_embd] normalized input, then block outputs (step schedule)
  uint16_t* hb;  // [n][max(n_embd, n_ff)] a product's input as bf16 (step schedule, matmul_takes_bf16)
};

void hidden_steps(const ModelImpl& m, const Batch& b, float* x, Activations& a) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff, kv = c.kv_dim(), n_pairs = c.rope_dim / 2;
  float* h = a.h;
  uint16_t* hb = matmul_takes_bf16(n) ? a.hb : nullptr;  // products' inputs as bf16
  for (int32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& L = m.layers[static_cast<size_t>(il)];
    const KvRows kv_new = kv_rows(b, il, a.k, a.v);  // in place in a batch of one span
    const MatmulTarget qkv[] = {{L.attn_q, a.q}, {L.attn_k, kv_new.k}, {L.attn_v, kv_new.v}};
    // h: the previous layer's MLP output, added to x here
    ops::add_norm_products(x, il == 0 ? nullptr : h, nullptr, {L.attn_norm_w.data(), nullptr, c.norm_eps}, qkv, h, hb, n, d);
#pragma omp parallel for if (n >= 16)
    for (int64_t r = 0; r < n; ++r) {
      ops::rope(a.q + r * d, c.n_head, c.head_dim, c.rope_dim, a.rot + r * n_pairs * 2);
      ops::rope(kv_new.k + r * kv, c.n_kv_head, c.head_dim, c.rope_dim, a.rot + r * n_pairs * 2);
    }
    store_kv(b, il, kv_new);
    attention(b, il, a.q, a.att);
    matmul(L.attn_out, a.att, n, h);

    const MatmulTarget gate_up[] = {{L.ffn_gate, a.gate}, {L.ffn_up, a.up}};
    ops::add_norm_products(x, h, nullptr, {L.ffn_norm_w.data(), nullptr, c.norm_eps}, gate_up, h, hb, n, d);
    const MatmulTarget down[] = {{L.ffn_down, h}};
    if (hb != nullptr) {
      ops::swiglu(a.gate, a.up, n * ff, hb);
      matmul_many_bf16(down, hb, n);
    } else {
      ops::swiglu(a.gate, a.up, n * ff);
      matmul(L.ffn_down, a.gate, n, h);
    }
  }
  if (c.n_layer > 0) ops::add(x, h, n * d);  // the last layer's MLP output
}

// x[j][r] += y[j][r] for rows j < n and columns r in [r0, r1) of [n][ld] arrays.
void add_columns(float* x, const float* y, int64_t n, int64_t ld, const RowRange& cols) {
  for (int64_t j = 0; j < n; ++j) {
    add_to(x + j * ld + cols.r0, y + j * ld + cols.r0, nullptr, cols.r1 - cols.r0);
  }
}

void hidden_team(const ModelImpl& m, const Batch& b, float* x, Activations& a) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff, kv = c.kv_dim(), n_pairs = c.rope_dim / 2;
  const int64_t layer_macs = n * (2 * d * d + 2 * d * kv + 3 * d * ff);
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
      ops::rms_norm(x, h, n, d, L.attn_norm_w.data(), c.norm_eps);
      const KvRows kv_new = kv_rows(b, il, a.k, a.v);
      const MatmulTarget qkv[] = {{L.attn_q, a.q}, {L.attn_k, kv_new.k}, {L.attn_v, kv_new.v}};
      matmul_many_part(qkv, h, n, t, n_threads, rows);
      for (int64_t r = 0; r < n; ++r) {  // rotate this thread's q and k columns (even boundaries)
        ops::rope_range(a.q + r * d, rows[0].r0, rows[0].r1, c.head_dim, c.rope_dim, a.rot + r * n_pairs * 2);
        ops::rope_range(kv_new.k + r * kv, rows[1].r0, rows[1].r1, c.head_dim, c.rope_dim, a.rot + r * n_pairs * 2);
      }
      barrier.wait(n_threads);
      store_kv(b, il, kv_new);       // shared by the team, then a barrier (none if in place)
      attention(b, il, a.q, a.att);  // shared by the team, then a barrier
      const MatmulTarget out[] = {{L.attn_out, y}};
      matmul_many_part(out, a.att, n, t, n_threads, rows);
      add_columns(x, y, n, d, rows[0]);
      barrier.wait(n_threads);

      ops::rms_norm(x, h, n, d, L.ffn_norm_w.data(), c.norm_eps);
      const MatmulTarget gate[] = {{L.ffn_gate, a.gate}}, up[] = {{L.ffn_up, a.up}};
      matmul_many_part(gate, h, n, t, n_threads, rows);
      matmul_many_part(up, h, n, t, n_threads, rows + 1);  // the same rows as gate's
      for (int64_t r = 0; r < n; ++r) silu_mul(a.gate + r * ff + rows[0].r0, a.up + r * ff + rows[0].r0, rows[0].r1 - rows[0].r0);
      barrier.wait(n_threads);
      const MatmulTarget down[] = {{L.ffn_down, y}};
      matmul_many_part(down, a.gate, n, t, n_threads, rows);
      add_columns(x, y, n, d, rows[0]);
      barrier.wait(n_threads);
    }
  }
}

}  // namespace

void llama_hidden(const ModelImpl& m, const Batch& b, float* x) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd;
  for (int64_t r = 0; r < n; ++r) matrix_get_row(m.token_embd, b.tokens[static_cast<size_t>(r)], x + r * d);
  Activations a(c, n);
  ops::rope_angles(b.pos.data(), n, c.rope_dim, c.rope_base, a.rot);
  if (n <= MATMUL_FUSED_MAX_N) {
    hidden_team(m, b, x, a);
  } else {
    hidden_steps(m, b, x, a);
  }
  ops::rms_norm(x, x, n, d, m.output_norm_w.data(), c.norm_eps);
}

}  // namespace backprompt::detail
